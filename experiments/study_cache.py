"""The tolerance study's sequences: every seed's rounds, trained once by jaxes' engine, cached.

The search and the training of round ``t`` depend on (seed, strategy, t) alone, never on the
stopping rule, which only truncates the sequence. So each (strategy, seed) runs once to the
longest horizon (``2 * max(budgets)`` rounds) through ``jaxes.rounds.run`` with a fixed patience
that can never be reached, and every rule is later replayed on the cached metrics.

The engine evaluates only its final best instance on test; a rule that stops earlier keeps an
earlier prefix-best round. Those rounds (the rounds that set a new validation best) are retrained
here from their round keys, which is bitwise deterministic on CPU (docs/design.md §4), and scored on
test; the retrained validation accuracy must equal the recorded one, or the study refuses the
sequence.
"""

from __future__ import annotations

import hashlib
import io
import json
import runpy
import shutil
import time
from pathlib import Path

from jaxes import files, workdir  # standard library only: no JAX at import

ROOT = Path(__file__).resolve().parents[1]
CACHE_VERSION = 1
STRATEGIES = ("random", "evolution")


def study_config(strategy: str, seed: int, horizon: int, *, smoke: bool, data_dir: str = ""):
    """The run config of one cached sequence (the default config, overridden).

    A small MLP space of 96 architectures (random search draws without replacement, so the
    space must exceed the 80-round horizon) and short training (at most 12 epochs) keep the
    full study cheap on 2 CPU cores. The smoke study (6 rounds) runs the smoke config's space.
    """
    config = runpy.run_path(str(ROOT / "configs" / "digits.py"))["get_config"](
        "smoke" if smoke else ""
    )
    config.seed = seed
    config.data_dir = data_dir
    config.rounds = horizon
    config.tolerance.patience = horizon  # a streak never reaches it: the run uses every round
    config.tolerance.extend = False
    config.search.strategy = strategy
    config.search.space.backbone = ("mlp",)
    config.knn = False
    # One round per generation: on 2 CPU cores K = 8 ran 0.38 rounds/s against K = 1's 0.64-0.77
    # once compiled (vmap buys no throughput on XLA:CPU, README "Population rounds"), and K = 1
    # keeps evolution sequential, so a rule replayed on the sequence sees exactly what a live
    # run with that rule would (at K > 1 a budget cuts generations short, which changes what
    # evolution proposes after it).
    config.parallel.rounds = 1
    config.parallel.pad_backbones = ("mlp",)  # one program per depth: widths and embeddings pad
    # The committed caches were trained with one program per depth (before depths padded, on
    # 2026-12-02): kept so that the study's command retrains exactly the sequences it reports.
    config.parallel.pad_depth_backbones = ()
    if smoke:
        # The smoke config's own 6 architectures and training, so the tests share its programs.
        config.search.population = 3
        config.search.tournament = 2
    else:
        config.search.population = 8
        config.search.tournament = 3
        config.search.space.depth = (1, 2, 3, 4)
        config.search.space.width = (16, 24, 32, 48, 64, 96)
        config.search.space.embed_dim = (8, 16, 32, 64)
        config.train.max_epochs = 12
        config.train.patience = 2
        config.train.learning_rate = 3e-3
    return config


def fingerprint(config) -> str:
    """A hash of what determines a sequence (not the stopping fields, not the data dir)."""
    # Fields added later, at the value every cached sequence ran with, hash as if absent.
    d = workdir.without_added_fields(json.loads(config.to_json()))
    fields = ("seed", "dataset", "metric", "mode", "rounds", "search", "train", "parallel")
    keep = {k: d[k] for k in fields}
    if keep["search"]["strategy"] != "tpe":  # tpe's settings shape only tpe's sequences
        keep["search"] = {k: v for k, v in keep["search"].items() if k != "tpe"}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def _short(arch: dict) -> str:
    return f"{arch['backbone']}-{arch['depth']}x{arch['width']}-e{arch['embed_dim']}"


# One retraining engine per process and config: a worker trains many sequences with the same
# data and training config, and a fresh engine re-traces (and reloads) every bucket's program.
_ENGINES: dict = {}


def _retrain_engine(config):
    from jaxes import data as data_lib
    from jaxes import runconfig, sharding
    from jaxes import train as train_lib

    space = runconfig.make_strategy(config).space
    pad = tuple(config.parallel.pad_backbones)
    depth = tuple(config.parallel.pad_depth_backbones)
    key = (config.dataset, config.data_dir, config.train.to_json(), json.dumps(space), pad, depth)
    if key not in _ENGINES:
        data = data_lib.load(config.dataset, config.data_dir or None)
        mesh = sharding.make_mesh()
        # The run's own engine settings (its space's buckets), so a round retrains bit for bit.
        engine = train_lib.Engine(
            data, config.train, mesh=mesh, space=space, pad_backbones=pad, depth_backbones=depth
        )
        _ENGINES[key] = (data, mesh, engine)
    return _ENGINES[key]


def train_sequence(config, workdir: Path) -> dict:
    """Runs (or resumes) one sequence with the engine and returns its compact cache entry.

    Args:
      config: a ``study_config``.
      workdir: the engine's run directory (kept until the entry is cached, for resume).

    Returns:
      ``{"fingerprint", "val", "val_loss", "epochs", "arch", "test", "wall_seconds"}``: per
      round lists (``None`` for a failed round's metrics) and ``test``, the test accuracy of
      every round that set a new validation best, keyed by the round index as a string.
    """
    from jaxes import infer, keys, rounds, runconfig
    from jaxes import train as train_lib
    from jaxes import workdir as workdir_lib

    workdir = Path(workdir)
    stale = workdir / "config.json"
    if stale.exists() and json.loads(stale.read_text()) != json.loads(
        workdir_lib.config_json(config)
    ):
        shutil.rmtree(workdir)  # an older study config's run: only a finished cache entry counts
    summary = rounds.run(config, workdir, stream=io.StringIO())
    records = workdir_lib.read_rounds(workdir)
    if len(records) != config.rounds:
        raise RuntimeError(f"{workdir}: {len(records)} rounds, expected {config.rounds}.")
    data, mesh, engine = _retrain_engine(config)
    root = keys.root(config.seed)
    test = {}
    for record in records:
        if not record["improved"]:
            continue
        t = record["round_index"]
        arch, learning_rate, weight_decay = runconfig.split_choice(record["arch"], config.train)
        job = train_lib.Job(arch, keys.round_key(root, t), learning_rate, weight_decay)
        result = engine.train([job])[0]
        if result.metrics[config.metric] != record["metric"]:
            raise RuntimeError(
                f"{workdir}: round {t} retrained to {config.metric} "
                f"{result.metrics[config.metric]}, recorded {record['metric']}; not deterministic."
            )
        evaluator = infer.Evaluator(result.graphdef, data.spec, mesh, config.train.eval_batch_size)
        test[str(t)] = evaluator.evaluate(result.state, data.test)["accuracy"]
    best = str(summary["best_round"])
    if test[best] != summary["test_accuracy"]:
        raise RuntimeError(f"{workdir}: retrained best scores {test[best]} on test, the run "
                           f"{summary['test_accuracy']}.")  # fmt: skip
    entry = {
        "fingerprint": fingerprint(config),
        "val": [r["metric"] for r in records],
        "val_loss": [r["val_loss"] for r in records],
        "epochs": [r["epochs"] for r in records],
        "arch": [_short(r["arch"]) for r in records],
        "test": test,
        "wall_seconds": round(sum(r["wall_seconds"] for r in records), 1),
    }
    shutil.rmtree(workdir)  # the entry holds all the study needs; the checkpoints are large
    return entry


def _worker(args) -> tuple[str, dict]:
    strategy, seed, horizon, smoke, data_dir, work_root = args
    config = study_config(strategy, seed, horizon, smoke=smoke, data_dir=data_dir)
    name = f"{strategy}-{seed}"
    return name, train_sequence(config, Path(work_root) / name)


def load_cache(path: Path) -> dict:
    """The cached sequences by name (``{}`` if the file is missing or of another version)."""
    if not path.exists():
        return {}
    blob = json.loads(path.read_text())
    return blob["sequences"] if blob.get("version") == CACHE_VERSION else {}


def save_cache(path: Path, sequences: dict) -> None:
    """Writes the cache compactly (one line per sequence) and atomically."""
    lines = [f"{json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}" for k, v in
             sorted(sequences.items())]  # fmt: skip
    body = ",\n".join(lines)
    text = f'{{"version": {CACHE_VERSION}, "sequences": {{\n{body}\n}}}}\n'
    files.atomic_write_text(path, text)


def ensure(path: Path, seeds, horizon: int, *, smoke: bool, work_root: Path, data_dir: str = "",
           workers: int = 1, minutes: float | None = None, log=print) -> dict:  # fmt: skip
    """Returns every (strategy, seed) sequence, training and caching only the missing ones.

    A cached entry whose fingerprint differs from the current config is retrained, so a
    changed search space or training config can never be read from a stale cache. With
    ``minutes``, training stops once that much time has passed (a run in flight resumes from
    its workdir next time); only seeds that both strategies finished are returned.
    """
    sequences = load_cache(path)
    todo = []
    # Seed by seed, both strategies, so a study cut short still compares them on the same seeds.
    for seed in seeds:
        for strategy in STRATEGIES:
            name = f"{strategy}-{seed}"
            want = fingerprint(study_config(strategy, seed, horizon, smoke=smoke))
            if sequences.get(name, {}).get("fingerprint") != want:
                todo.append((strategy, seed, horizon, smoke, data_dir, str(work_root)))
    if todo and minutes is not None and minutes <= 0:
        log(f"{len(todo)} sequences not trained (--train_minutes 0): reporting on the rest")
    elif todo:
        log(f"training {len(todo)} sequences of {horizon} rounds ({workers} workers)")
        deadline = None if minutes is None else time.monotonic() + 60 * minutes
        if workers > 1:
            import multiprocessing

            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                for name, entry in pool.imap_unordered(_worker, todo):
                    sequences[name] = entry
                    save_cache(path, sequences)
                    log(f"  {name}: {entry['wall_seconds']} s")
                    if deadline is not None and time.monotonic() > deadline:
                        log("  out of training time: the runs in flight resume next time")
                        pool.terminate()
                        break
        else:
            for args in todo:
                name, entry = _worker(args)
                sequences[name] = entry
                save_cache(path, sequences)
                log(f"  {name}: {entry['wall_seconds']} s")
                if deadline is not None and time.monotonic() > deadline:
                    break
    # Only seeds that both strategies finished: every comparison is paired.
    done = [s for s in seeds if all(f"{st}-{s}" in sequences for st in STRATEGIES)]
    return {f"{st}-{s}": sequences[f"{st}-{s}"] for st in STRATEGIES for s in done}
