"""A 10-round random search over KerasTuner's space: jaxes against KerasTuner, side by side.

    python3 -m venv .venv-peer && .venv-peer/bin/pip install -r benchmarks/requirements-peer.txt
    .venv/bin/python benchmarks/search_vs_peer.py [--seeds=0,1,2 --populations=1,10]

Both sides search mlp/cnn x depth 1-3 x width 64/128/256 x embedding 32/64 (36 architectures)
on the same digits split (jaxes' train/validation/test, exported to the peer as arrays), batch
32, at most 100 epochs, early stop on validation loss with patience 5, the best epoch kept,
AdamW 1e-3 / 1e-4, dropout log-uniform in [0.02, 0.5], keeping the trial with the best
validation accuracy. Each side runs cold, in its own fresh process: no persistent compilation
cache, so every compile is paid. jaxes runs its ``random`` strategy for exactly 10 rounds
(fixed patience 10, no extension) at each ``--populations`` K (K rounds per program,
docs/design.md §6b).

Printed per seed and side: wall seconds, compile seconds (jaxes: XLA compile time counted with
``jax.monitoring``), rounds per minute, best validation and test accuracy, and the wall-time
ratio jaxes / KerasTuner (lower is better for jaxes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER_PYTHON = ROOT / ".venv-peer" / "bin" / "python"


def peer_space_config(seed: int, trials: int, population: int = 1):
    """``configs/digits.py`` set to the peer's search: random over KerasTuner's space, exactly
    ``trials`` rounds, batch 32, at most 100 epochs, patience 5."""
    sys.path.insert(0, str(ROOT / "configs"))
    import digits

    config = digits.get_config()
    config.seed = seed
    config.rounds = trials
    config.search.strategy = "random"
    config.search.space.backbone = ("mlp", "cnn")
    config.search.space.depth = (1, 2, 3)
    config.search.space.width = (64, 128, 256)
    config.search.space.embed_dim = (32, 64)
    config.tolerance.patience = trials
    config.tolerance.extend = False
    config.train.batch_size = 32
    config.train.max_epochs = 100
    config.train.patience = 5
    config.parallel.rounds = population
    config.knn = False
    return config


def jaxes_side(args) -> None:
    """Runs the jaxes search in this (fresh) process and writes its JSON result."""
    os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    import jax
    from jax import monitoring

    from jaxes import rounds

    compile_seconds = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compile_seconds.append(duration)

    monitoring.register_event_duration_secs_listener(listen)
    config = peer_space_config(args.seed, args.trials, args.population)
    with tempfile.TemporaryDirectory() as workdir, open(os.devnull, "w") as devnull:
        start = time.monotonic()
        summary = rounds.run(config, workdir, stream=devnull)
        wall = time.monotonic() - start
    result = {
        "tool": f"jaxes K={args.population} (jax {jax.__version__})",
        "wall_seconds": wall,
        "compile_seconds": sum(compile_seconds),
        "trials": summary["rounds_run"],
        "best_val_accuracy": summary["best_metric"],
        "best_test_accuracy": summary["test_accuracy"],
        "best_hp": summary["best_arch"],
    }
    Path(args.out).write_text(json.dumps(result, indent=1))


def export_split(path: Path) -> None:
    from jaxes import data

    d = data.load("digits")
    import numpy as np

    splits = {"train": d.train, "val": d.validation, "test": d.test}
    arrays = {f"{name}_images": split.images for name, split in splits.items()}
    arrays.update({f"{name}_labels": split.labels for name, split in splits.items()})
    np.savez(path, **arrays)


def _run(cmd, out: Path) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{cmd[1]} failed:\n{proc.stderr[-4000:]}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--populations", default="1,10")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--json", default=None, help="write every result here too")
    parser.add_argument("--side", choices=["driver", "jaxes"], default="driver")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--population", type=int, default=1)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.side == "jaxes":
        return jaxes_side(args)
    if not PEER_PYTHON.exists():
        raise SystemExit(
            f"no peer venv at {PEER_PYTHON.parent.parent}; create it with: python3 -m venv "
            ".venv-peer && .venv-peer/bin/pip install -r benchmarks/requirements-peer.txt"
        )
    load = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        split = Path(tmp) / "split.npz"
        export_split(split)
        for seed in (int(s) for s in args.seeds.split(",")):
            out = Path(tmp) / f"peer{seed}.json"
            cmd = [str(PEER_PYTHON), str(ROOT / "benchmarks" / "peer_kerastuner.py"), str(split),
                   str(out), f"--trials={args.trials}", f"--seed={seed}"]  # fmt: skip
            peer = _run(cmd, out)
            rows.append({"seed": seed, **peer})
            for k in (int(p) for p in args.populations.split(",")):
                out = Path(tmp) / f"jaxes{seed}_{k}.json"
                cmd = [sys.executable, __file__, "--side=jaxes", f"--seed={seed}",
                       f"--population={k}", f"--trials={args.trials}", f"--out={out}"]  # fmt: skip
                mine = _run(cmd, out)
                mine["ratio_to_peer"] = mine["wall_seconds"] / peer["wall_seconds"]
                rows.append({"seed": seed, **mine})
    print(f"load average at start {load:.2f}, at end {os.getloadavg()[0]:.2f}")
    print("| seed | tool | wall s | compile s | rounds/min | best val | best test | "
          "wall / KerasTuner |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        compile_s = f"{r['compile_seconds']:.1f}" if "compile_seconds" in r else "-"
        ratio = f"{r['ratio_to_peer']:.2f}x" if "ratio_to_peer" in r else "1.00x"
        print(
            f"| {r['seed']} | {r['tool']} | {r['wall_seconds']:.1f} | {compile_s} | "
            f"{60 * r['trials'] / r['wall_seconds']:.1f} | {r['best_val_accuracy']:.4f} | "
            f"{r['best_test_accuracy']:.4f} | {ratio} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
