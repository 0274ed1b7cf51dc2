"""tpe against random and evolution at equal rounds, on digits, over seeds.

    .venv/bin/python experiments/strategy_study.py

Every (strategy, seed) runs a fixed number of rounds (no stopping rule: the comparison is of the
searches, at equal budgets) in generations of ``--population`` rounds, through jaxes' own engine:
``search.make`` proposes, ``train.Engine`` trains each generation in one program per bucket,
the strategy observes the validation accuracy. Every round's instance is also scored on the test
split, which no strategy sees. For each round count ``t`` the table gives, over seeds, the best
validation accuracy of the first ``t`` rounds and the test accuracy of that round's instance (the
instance a run stopped at ``t`` would keep). Round ``t`` of one seed uses the round key of
``(seed, t)`` for every strategy, so the strategies differ in their proposals only.

Results are cached per (strategy, seed) in ``experiments/results/strategy_study.json`` under a key
of the settings, so a rerun (or a larger ``--seeds``) trains only what is missing; the table goes
to stdout and ``experiments/results/strategy_study.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import runpy
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
STRATEGIES = ("random", "evolution", "tpe")

# A space where the search matters: MLP sizes and a training learning rate over three decades
# (too low does not converge in the epoch cap, too high diverges or jumps about).
SPACE = {
    "depth": (1, 2, 3),
    "width": (32, 64, 128),
    "embed_dim": (16, 32, 64),
    "learning_rate": {"low": 1e-4, "high": 1e-1, "log": True},
    "weight_decay": {"low": 1e-6, "high": 1e-2, "log": True},
}


def study_config(strategy: str, seed: int, *, max_epochs: int):
    """The default config with the study's space, strategy and seed."""
    config = runpy.run_path(str(ROOT / "configs" / "digits.py"))["get_config"]()
    config.seed = seed
    config.search.strategy = strategy
    config.search.space = SPACE
    config.search.population = 4
    config.search.tournament = 2
    config.search.tpe.startup = 4
    config.train.max_epochs = max_epochs
    return config


def run_one(strategy: str, seed: int, args, data, engine, evaluators) -> list[dict]:
    """One (strategy, seed) sequence: ``args.rounds`` rounds; each round's val and test accuracy."""
    from jaxes import infer, keys, runconfig, train

    config = study_config(strategy, seed, max_epochs=args.max_epochs)
    search = runconfig.make_strategy(config)
    state, root, rows = search.init(), keys.root(seed), []
    for first in range(0, args.rounds, args.population):
        proposals = []
        for t in range(first, min(first + args.population, args.rounds)):
            round_key = keys.round_key(root, t)
            choice, state = search.propose(state, keys.RoundKeys.of(round_key).arch)
            proposals.append((t, choice, round_key))
        jobs = []
        for _, choice, round_key in proposals:
            arch, learning_rate, weight_decay = runconfig.split_choice(choice, config.train)
            jobs.append(train.Job(arch, round_key, learning_rate, weight_decay))
        for (t, choice, _), result in zip(proposals, engine.train(jobs), strict=True):
            val = None if result.failed else result.metrics["val_accuracy"]
            state = search.observe(state, choice, val, t)
            test = None
            if result.state is not None and val is not None:
                if result.arch not in evaluators:
                    evaluators[result.arch] = infer.Evaluator(
                        result.graphdef, data.spec, engine.mesh, 512
                    )
                test = evaluators[result.arch].evaluate(result.state, data.test)["accuracy"]
            rows.append({"round_index": t, "choice": choice, "val": val, "test": test})
    return rows


def best_so_far(rows: list[dict], t: int) -> tuple[float, float]:
    """(best validation accuracy of rounds < t, test accuracy of that round); earliest on ties."""
    best = None
    for row in rows[:t]:
        if row["val"] is not None and (best is None or row["val"] > best["val"]):
            best = row
    return (math.nan, math.nan) if best is None else (best["val"], best["test"])


def table(runs: dict, counts: list[int]) -> str:
    """The markdown table: mean (standard deviation) over seeds per strategy and round count,
    and how often tpe's best validation accuracy beats, ties and loses to each other's."""
    lines = [
        "| rounds | strategy | best val acc | its test acc | tpe vs it (win/tie/loss) |",
        "|---:|---|---:|---:|---:|",
    ]
    for t in counts:
        tpe = {seed: best_so_far(rows, t) for seed, rows in runs.get("tpe", {}).items()}
        for strategy in STRATEGIES:
            per_seed = {seed: best_so_far(rows, t) for seed, rows in runs.get(strategy, {}).items()}
            if not per_seed:
                continue
            vals = [v for v, _ in per_seed.values()]
            tests = [x for _, x in per_seed.values()]
            record = "-"
            if strategy != "tpe":
                common = sorted(set(tpe) & set(per_seed))
                wins = sum(tpe[s][0] > per_seed[s][0] for s in common)
                ties = sum(tpe[s][0] == per_seed[s][0] for s in common)
                record = f"{wins}/{ties}/{len(common) - wins - ties}"
            lines.append(f"| {t} | {strategy} | {_stat(vals)} | {_stat(tests)} | {record} |")
    return "\n".join(lines)


def _stat(values: list[float]) -> str:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.4f} ({spread:.4f})"


def settings_key(args) -> str:
    """What the cached sequences depend on: the space and the training settings."""
    text = json.dumps(
        {"space": SPACE, "rounds": args.rounds, "population": args.population,
         "max_epochs": args.max_epochs, "version": 1},
        sort_keys=True,
    )  # fmt: skip
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--population", type=int, default=4, help="rounds per generation (K)")
    parser.add_argument("--max_epochs", type=int, default=60)
    parser.add_argument("--data_dir", default="")
    parser.add_argument("--out", default=str(RESULTS / "strategy_study.json"))
    args = parser.parse_args(argv)

    from jaxes import data as data_lib
    from jaxes import runconfig, sharding, train

    out = Path(args.out)
    cache = json.loads(out.read_text()) if out.exists() else {}
    key = settings_key(args)
    runs = cache.get(key, {})
    config = study_config("random", 0, max_epochs=args.max_epochs)
    data = data_lib.load("digits", args.data_dir or data_lib.default_data_dir())
    mesh = sharding.make_mesh(population=args.population)
    # One engine for every sequence: its compiled programs (one per bucket) are shared.
    bounds = runconfig.make_strategy(config).space
    # One program per depth, as when experiments/results/strategy_study.json was trained.
    engine = train.Engine(
        data, config.train, mesh=mesh, space=bounds, pad_backbones=("mlp",), depth_backbones=()
    )
    evaluators: dict = {}
    start = time.monotonic()
    for seed in range(args.seeds):
        for strategy in STRATEGIES:
            done = runs.setdefault(strategy, {})
            if str(seed) in done:
                continue
            began = time.monotonic()
            done[str(seed)] = run_one(strategy, seed, args, data, engine, evaluators)
            print(f"{strategy} seed {seed}: {time.monotonic() - began:.0f}s", file=sys.stderr)
            cache[key] = runs
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(cache, sort_keys=True) + "\n")
    runs = {s: {int(k): v for k, v in runs[s].items() if int(k) < args.seeds} for s in runs}
    counts = sorted({args.population, args.rounds // 2, args.rounds} | {8})
    text = table(runs, [c for c in counts if c <= args.rounds])
    command = ".venv/bin/python experiments/strategy_study.py"
    if argv:
        command += " " + " ".join(argv)
    header = (
        f"Digits, {args.seeds} seeds, {args.rounds} rounds in generations of {args.population}, "
        f"max {args.max_epochs} epochs per round; wall {time.monotonic() - start:.0f}s for the "
        f"uncached part.\n\n`{command}`\n\n"
    )
    print(header + text)
    (out.with_suffix(".md")).write_text(header + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
