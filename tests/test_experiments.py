"""experiments/seeds.sh on a fresh clone (no runs/ yet), with the jobs stubbed out."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Stands in for .venv/bin/python: `-m jaxes.main` writes the summary a run would, anything else
# (the script's table and `-m jaxes.report`) runs in the real interpreter.
_FAKE_PYTHON = textwrap.dedent(
    f"""\
    #!{sys.executable}
    import json, os, sys
    args = sys.argv[1:]
    if args[:2] == ["-m", "jaxes.main"]:
        flags = dict(a.split("=", 1) for a in args[2:])
        seed = int(flags["--config.seed"])
        os.makedirs(flags["--workdir"])
        summary = {{"seed": seed, "r": -0.5, "patience": 5, "rounds_run": 9, "rounds_budget": 12,
                   "stop_reason": "patience", "best_round": 3, "best_metric": 0.97,
                   "test_metric": 0.96, "knn_top1": 0.95, "wall_seconds": 60.0}}
        with open(os.path.join(flags["--workdir"], "summary.json"), "w") as f:
            json.dump(summary, f)
        print("fake run", seed)
    elif args[:2] == ["-m", "jaxes.report"]:
        print("report of", len(args) - 2, "runs")
    else:
        os.execv({sys.executable!r}, [{sys.executable!r}, *args])
    """
)


def test_seeds_sh_runs_on_a_fresh_clone(tmp_path):
    clone = tmp_path / "clone"
    (clone / "experiments").mkdir(parents=True)
    shutil.copy(ROOT / "experiments" / "seeds.sh", clone / "experiments" / "seeds.sh")
    fake = clone / ".venv" / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text(_FAKE_PYTHON)
    fake.chmod(0o755)
    proc = subprocess.run(["bash", "experiments/seeds.sh"], cwd=clone, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = [
        line for line in proc.stdout.splitlines() if line.startswith("| ") and "---" not in line
    ]
    assert [row.split("|")[1].strip() for row in rows[1:]] == ["0", "1", "2", "3", "4", "5"]
    assert proc.stdout.strip().endswith("report of 6 runs")
    assert (clone / "runs" / "seeds" / "logs" / "seed5.log").read_text() == "fake run 5\n"
    summary = json.loads((clone / "runs" / "seeds" / "seed0" / "summary.json").read_text())
    assert summary["seed"] == 0
