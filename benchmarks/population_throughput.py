"""Rounds per minute of the default search at population sizes K, and compile cost per program.

    .venv/bin/python benchmarks/population_throughput.py [--populations=1,4,8,32 --rounds=32]

Each K runs the default config (configs/digits.py: aging evolution over MLP and CNN, depth 1-2,
width 64/128, embedding 32/64) for exactly ``--rounds`` rounds (fixed patience, no budget
extension, so every K trains the same number of rounds), in a fresh process with no persistent
compilation cache, so every compile is paid. Then, with ``--warm``, the same run again on a
persistent cache that the first run filled: what a rerun of a study costs.

On a CPU run of one process and one device the engine trains each round of a generation as its
own program, side by side on one host thread per core (``train.Engine._threads``);
``--one_thread`` also runs each K > 1 the other way, vmapped groups on one thread, for the
comparison. Printed per K: the engine's host threads (a generation of one round runs on one),
wall seconds, rounds per minute, XLA compile seconds (``jax.monitoring``), the number of programs
compiled (one per bucket and group size), distinct architectures, compile
seconds per architecture and per program, best validation accuracy.
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


def one_run(args) -> None:
    """One search in this fresh process; writes its JSON result to ``--out``."""
    from jax import monitoring

    from jaxes import rounds, train, workdir

    compiles = []

    def listen(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    monitoring.register_event_duration_secs_listener(listen)
    programs = []
    real_init = train.Engine.__init__

    def spy(self, *a, **kw):
        real_init(self, *a, **kw)
        programs.append(self)

    train.Engine.__init__ = spy
    threads = [1]
    auto_threads = train.Engine._threads

    def count_threads(self):
        n = 1 if args.one_thread else auto_threads(self)
        threads.append(n)
        return n

    train.Engine._threads = count_threads
    sys.path.insert(0, str(ROOT / "configs"))
    import digits

    config = digits.get_config()
    config.rounds = args.rounds
    config.tolerance.patience = args.rounds
    config.tolerance.extend = False
    config.parallel.rounds = args.population
    if args.pad_depth is not None:
        config.parallel.pad_depth_backbones = tuple(b for b in args.pad_depth.split(",") if b)
    config.knn = False
    with tempfile.TemporaryDirectory() as path, open(os.devnull, "w") as devnull:
        start = time.monotonic()
        summary = rounds.run(config, path, stream=devnull)
        wall = time.monotonic() - start
        records = workdir.read_rounds(path)
    result = {
        "population": args.population,
        "threads": max(threads),
        "wall_seconds": wall,
        "rounds": summary["rounds_run"],
        "compile_seconds": sum(compiles),
        "programs": programs[0].compiles,
        "archs": len({json.dumps(r["arch"], sort_keys=True) for r in records}),
        "buckets": len({r["bucket"] for r in records}),
        "best_val_accuracy": summary["best_metric"],
    }
    Path(args.out).write_text(json.dumps(result))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--populations", default="1,4,8,32")
    parser.add_argument("--rounds", type=int, default=32)
    parser.add_argument("--warm", action="store_true", help="also rerun on a filled cache")
    parser.add_argument("--json", default=None)
    parser.add_argument("--population", type=int, default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--pad_depth",
        default=None,
        help="config.parallel.pad_depth_backbones, comma-separated ('' for none)",
    )
    parser.add_argument("--one_thread", action="store_true",
                        help="also run each K > 1 with the groups on one host thread")  # fmt: skip
    args = parser.parse_args()
    if args.population is not None:
        return one_run(args)
    load = os.getloadavg()[0]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(int(p), False) for p in args.populations.split(",")]
        if args.one_thread:
            runs += [(k, True) for k, _ in runs if k > 1]
        for k, one_thread in runs:
            cache = Path(tmp) / f"cache{k}{'_1' if one_thread else ''}"
            modes = [("cold", None)] + ([("warm", cache)] if args.warm else [])
            for mode, _ in modes:
                env = dict(os.environ)
                env.pop("JAX_COMPILATION_CACHE_DIR", None)
                if args.warm:  # the cold run fills the cache the warm run reads
                    env["JAX_COMPILATION_CACHE_DIR"] = str(cache)
                    env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
                out = Path(tmp) / f"{k}_{mode}_{one_thread}.json"
                cmd = [sys.executable, __file__, f"--population={k}", f"--rounds={args.rounds}",
                       f"--out={out}"] + (["--one_thread"] if one_thread else [])  # fmt: skip
                if args.pad_depth is not None:
                    cmd.append(f"--pad_depth={args.pad_depth}")
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
                if proc.returncode:
                    raise SystemExit(proc.stderr[-4000:])
                rows.append({"mode": mode, **json.loads(out.read_text())})
    print(f"load average at start {load:.2f}, at end {os.getloadavg()[0]:.2f}")
    base = {r["mode"]: r for r in rows if r["population"] == rows[0]["population"]}
    print("| K | threads | cache | wall s | rounds/min | vs K=1 | compile s | programs | archs | "
          "compile s / arch | compile s / program | best val |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        rpm = 60 * r["rounds"] / r["wall_seconds"]
        ref = base[r["mode"]]
        speedup = rpm / (60 * ref["rounds"] / ref["wall_seconds"])
        per_program = r["compile_seconds"] / max(r["programs"], 1)
        print(
            f"| {r['population']} | {r['threads']} | {r['mode']} | {r['wall_seconds']:.1f} | "
            f"{rpm:.1f} | "
            f"{speedup:.2f}x | {r['compile_seconds']:.1f} | {r['programs']} | {r['archs']} | "
            f"{r['compile_seconds'] / r['archs']:.2f} | {per_program:.2f} | "
            f"{r['best_val_accuracy']:.4f} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
