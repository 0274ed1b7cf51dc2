#!/usr/bin/env bash
# The default job over seeds 0-5: how the drawn tolerance shapes the run (experiments/README.md).
# Usage: bash experiments/seeds.sh [OUT_DIR]   (~1 min per seed on 2 CPU cores)
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/seeds}"
mkdir -p "$out/logs"  # a fresh clone has no runs/ yet
for seed in 0 1 2 3 4 5; do
  log="$out/logs/seed$seed.log"
  .venv/bin/python -m jaxes.main --config=configs/digits.py --workdir="$out/seed$seed" \
    --config.seed="$seed" > "$log" 2>&1 || { cat "$log"; exit 1; }
done
.venv/bin/python - "$out" <<'PY'
import json, pathlib, sys
print("| seed | r | tolerance | rounds run / budget | stop | best round | val acc | test acc | kNN top-1 | wall s |")
print("|---|---|---|---|---|---|---|---|---|---|")
for run in sorted(pathlib.Path(sys.argv[1]).glob("seed[0-9]*")):
    s = json.loads((run / "summary.json").read_text())
    print(f"| {s['seed']} | {s['r']:.3f} | {s['patience']} | {s['rounds_run']} / {s['rounds_budget']} | "
          f"{s['stop_reason']} | {s['best_round']} | {s['best_metric']:.4f} | {s['test_metric']:.4f} | "
          f"{s['knn_top1']:.4f} | {s['wall_seconds']:.0f} |")
PY
# Every run's rounds, one row per run (the same as CSV with --csv):
.venv/bin/python -m jaxes.report "$out"/seed[0-9]*
