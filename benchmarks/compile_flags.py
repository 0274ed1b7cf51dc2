"""XLA:CPU's compile options (fusion emitters, LLVM -O level): compile and train seconds.

    .venv/bin/python benchmarks/compile_flags.py [--trials=3 --repeats=3]
        [--settings=default,emitters-off,O2,emitters-off-O2] [--backbone=mlp]

Each setting is an ``XLA_FLAGS`` value (``SETTINGS``) for a whole process. The fusion emitters
off and LLVM at -O2 compile jaxes' programs faster and run them slower (README, "Training
speed"); the test suite sets both, since it is mostly compiling (``tests/conftest.py``), and
jaxes' once-per-round init programs ask for them (``sharding.RUN_ONCE_CPU``). This measures the
trade: each setting runs the first ``--trials`` rounds of ``search_vs_peer.py``'s random search
(seed 0, so the same architectures at every setting; ``--backbone`` restricts the space), cold
in a fresh process (no persistent compilation cache), ``--repeats`` times, alternating settings
so that a busy machine slows all alike. Printed per setting: the median over repeats of the XLA
compile seconds of the round programs (one per architecture bucket), of every compile, of the
wall time and of the wall time less compiles; and whether every round's recorded validation loss
equals the first setting's (a weak check: weights can differ in the last bits while it holds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ROUND_PROGRAM = "jit(round_program)"  # population.program's name in XLA's compile events
SETTINGS = {
    "default": "",
    "emitters-off": "--xla_cpu_use_fusion_emitters=false",
    "O0": "--xla_backend_optimization_level=0",
    "O1": "--xla_backend_optimization_level=1",
    "O2": "--xla_backend_optimization_level=2",
    "emitters-off-O2": "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=2",
    "emitters-off-O0": "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=0",
}


def child(trials: int, backbone: str, out: str) -> None:
    """One cold run in this process: compile seconds by program name, round losses, wall."""
    os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)
    from jax import monitoring

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import search_vs_peer

    from jaxes import rounds

    compiles: dict[str, float] = {}

    def listen(event, duration, fun_name="?", **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles[fun_name] = compiles.get(fun_name, 0.0) + duration

    monitoring.register_event_duration_secs_listener(listen)
    config = search_vs_peer.peer_space_config(seed=0, trials=trials)
    if backbone:
        config.search.space.backbone = (backbone,)
    config.plots = False
    with tempfile.TemporaryDirectory() as workdir, open(os.devnull, "w") as devnull:
        start = time.monotonic()
        rounds.run(config, workdir, stream=devnull)
        wall = time.monotonic() - start
        lines = (Path(workdir) / "rounds.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
    result = {
        "wall": wall,
        "compiles": compiles,
        "val_loss": [r["val_loss"] for r in records],
        "archs": [r["arch"] for r in records],
    }
    Path(out).write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--settings", default=",".join(SETTINGS), help=f"comma-separated, of {list(SETTINGS)}"
    )
    parser.add_argument("--backbone", default="", help="search only this backbone (mlp, cnn)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.trials, args.backbone, args.child)
    unknown = [n for n in args.settings.split(",") if n not in SETTINGS]
    if unknown:
        raise SystemExit(f"--settings: unknown {unknown}; choose from {list(SETTINGS)}.")
    runs: dict[str, list[dict]] = {name: [] for name in args.settings.split(",")}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for name in runs:
                flag = SETTINGS[name]
                out = Path(tmp) / "run.json"
                env = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu")
                env.pop("JAX_COMPILATION_CACHE_DIR", None)
                cmd = [sys.executable, __file__, f"--trials={args.trials}", f"--child={out}",
                       f"--backbone={args.backbone}"]  # fmt: skip
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
                runs[name].append(json.loads(out.read_text()))
    first = next(iter(runs.values()))[0]
    print(f"{args.trials} rounds: {[a['backbone'] + str(a['depth']) for a in first['archs']]}, "
          f"{args.repeats} cold runs per setting, medians")  # fmt: skip
    print("| setting | XLA_FLAGS | round programs compile s | all compiles s | wall s "
          "| wall - compiles s | val losses equal |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name, rs in runs.items():
        program = statistics.median(r["compiles"].get(ROUND_PROGRAM, 0.0) for r in rs)
        every = statistics.median(sum(r["compiles"].values()) for r in rs)
        wall = statistics.median(r["wall"] for r in rs)
        train = statistics.median(r["wall"] - sum(r["compiles"].values()) for r in rs)
        equal = all(r["val_loss"] == first["val_loss"] for r in rs)
        flags = SETTINGS[name] or "(none)"
        print(f"| {name} | `{flags}` | {program:.1f} | {every:.1f} | {wall:.1f} | {train:.1f} "
              f"| {equal} |")  # fmt: skip


if __name__ == "__main__":
    main()
