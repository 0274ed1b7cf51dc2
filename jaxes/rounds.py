"""The method (claim 1): rounds of search -> train to convergence -> judge, until the tolerance.

``run(config, workdir)`` is the whole job, with nothing global: per round ``t`` it proposes an
architecture (claim 6), trains an instance to convergence (claims 1-2), updates the tolerance
state (claims 1, 3-5) and, atomically, records the round, saves the best instance (Orbax) and
commits the resume state. Re-running on the same workdir resumes and ends exactly as an
uninterrupted run would: every round's randomness is a pure function of (seed, round index).
"""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path

import jax
from flax import nnx

from jaxes import (
    checkpoint,
    infer,
    instance,
    keys,
    models,
    plot,
    search,
    sharding,
    tboard,
)
from jaxes import data as data_lib
from jaxes import progress as progress_lib
from jaxes import train as train_lib
from jaxes import workdir as workdir_lib
from jaxes.runconfig import (
    check_batch_size,
    check_config,
    make_strategy,
    make_tolerance,
    tolerance_rule,
)


def _round_record(t, choice, result, tol, config, round_key, seconds) -> dict:
    metric = None if result.failed else result.metrics[config.metric]
    return {
        "round_index": t,
        "status": "failed" if result.failed else "ok",
        "message": result.message,
        "arch": choice,
        "seed": config.seed,
        # The raw round key: every stream of the round (init, data order, dropout) derives from it.
        "round_key": [int(v) for v in jax.random.key_data(round_key).ravel()],
        "log_rate": result.log_rate,
        "dropout_rate": math.exp(result.log_rate),
        "epochs": result.epochs,
        "driver": result.driver,
        "best_epoch": result.best_epoch,
        "metric": metric,
        **{k: result.metrics.get(k) for k in ("val_loss", "val_accuracy", "train_loss")},
        "improved": tol.improved,
        "best": tol.best,
        "best_round": tol.best_round,
        "streak": tol.streak,
        "patience": tol.patience,
        "rounds_budget": tol.rounds,
        "stopped": tol.stopped,
        "reason": tol.reason,
        # The gain rule's estimates (None under the patent's rule, which has none).
        "expected_gain": getattr(tol, "gain", None),
        "noise_floor": getattr(tol, "floor", None),
        "wall_seconds": seconds,
    }


def _resume(ckpt, workdir, is_primary):
    """Loads the committed state and the round records it covers.

    A killed run may have written a record past the commit; it is dropped here and recomputed
    identically, since a round's randomness depends on (seed, round index) alone.
    """
    state = ckpt.load_state()
    committed = 0 if state is None else state["next_round"]
    records = workdir_lib.read_rounds(workdir)[:committed]
    if is_primary:
        workdir_lib.write_rounds(workdir, records)
    return state, records


def _finish(config, workdir, data, mesh, tol, stop_reason, records, wall_seconds):
    """Evaluates the best instance on test, embeds for kNN, writes summary/plot; returns summary."""
    summary = {
        "best_round": tol.best_round,
        "best_metric": tol.best,
        "metric": config.metric,
        "mode": config.mode,
        "rule": config.tolerance.rule,
        "test_metric": None,
        "test_accuracy": None,
        "test_loss": None,
        "rounds_run": tol.round,
        "rounds_budget": tol.rounds,
        "patience": tol.patience,
        "r": tol.r,
        "stop_reason": stop_reason,
        "best_arch": None,
        "seed": config.seed,
        "wall_seconds": wall_seconds,
    }
    if tol.best_round is not None:
        model, meta = instance.load(workdir, round_index=tol.best_round)
        graphdef, state = nnx.split(model)
        evaluator = infer.Evaluator(graphdef, data.spec, mesh, config.train.eval_batch_size)
        test = evaluator.evaluate(state, data.test)
        summary["test_accuracy"], summary["test_loss"] = test["accuracy"], test["loss"]
        summary["test_metric"] = test[config.metric.removeprefix("val_")]
        summary["best_arch"] = meta["arch"]
        if config.knn:
            summary["knn_top1"] = infer.knn_top1(
                evaluator.embed(state, data.train.images),
                data.train.labels,
                evaluator.embed(state, data.test.images),
                data.test.labels,
            )
    if jax.process_index() == 0:
        workdir_lib.write_summary(workdir, summary)
        plot.plot_rounds(
            records, Path(workdir) / "rounds.png", metric_name=config.metric, mode=config.mode
        )
    return summary


def run(config, workdir, *, stream=None, live=None) -> dict:
    """Runs (or resumes) the rounds job of ``config`` in ``workdir``.

    Args:
      config: the run config (configs/digits.py declares every field).
      workdir: the run directory; created if missing.
      stream: where progress goes (default stderr); live redraws on a terminal.
      live: force the live progress line on or off (default: ``stream.isatty()``).

    Returns:
      The summary dict, also written to ``workdir/summary.json``.
    """
    check_config(config)
    is_primary = jax.process_index() == 0
    data = data_lib.load(config.dataset, config.data_dir or None)
    mesh = sharding.make_mesh()
    check_batch_size(config, data, mesh)
    workdir_lib.claim(workdir, config, write=is_primary)
    root = keys.root(config.seed)
    strategy = make_strategy(config)
    rule = tolerance_rule(config)  # stopping (the patent's) or gain: one protocol

    ckpt = checkpoint.Checkpointer(Path(workdir) / "checkpoints", is_primary=is_primary)
    state, records = _resume(ckpt, workdir, is_primary)
    if state is None:
        tol = make_tolerance(config, root)
        strategy_state, wall_before = strategy.init(), 0.0
    else:
        tol = rule.State.from_dict(state["tolerance"])
        strategy_state, wall_before = state["strategy"], state["wall_seconds"]
    ckpt.keep_only(tol.best_round)  # exactly the committed best stays on disk
    stop_reason = None

    start = time.monotonic()
    progress = progress_lib.Progress(stream=stream or sys.stderr, live=live, enabled=is_primary)
    progress.resume(records)
    # On resume, drop TensorBoard events past the committed round (a kill may have left them).
    writer = tboard.ScalarWriter(
        Path(workdir) / "tensorboard", enabled=is_primary, purge_step=tol.round if state else None
    )
    with progress, writer, ckpt:
        while not tol.stopped and stop_reason is None:
            t = tol.round
            round_start = time.monotonic()
            round_key = keys.round_key(root, t)
            try:
                choice, pending = strategy.propose(
                    strategy_state, keys.RoundKeys.of(round_key).arch
                )
            except search.Exhausted:
                stop_reason = "search_exhausted"
                break
            progress.start_round(t, tol.rounds)
            result = train_lib.to_convergence(
                models.Arch.from_dict(choice),
                data,
                round_key,
                config.train,
                mesh=mesh,
                on_epoch=lambda epoch, m: progress.epoch(epoch, m["val_loss"]),
            )
            metric = math.nan if result.failed else result.metrics[config.metric]
            fitness = None if result.failed else (metric if config.mode == "max" else -metric)
            strategy_state = strategy.observe(pending, choice, fitness, t)
            tol = rule.update(tol, metric)
            record = _round_record(
                t, choice, result, tol, config, round_key, time.monotonic() - round_start
            )
            if is_primary:
                workdir_lib.append_round(workdir, record)
            if tol.improved:
                meta = {
                    "round_index": t,
                    "arch": choice,
                    "input_spec": data.spec.to_dict(),
                    "log_rate": result.log_rate,
                    "metrics": result.metrics,
                    "metric": config.metric,
                    "dataset": config.dataset,
                }
                instance.save(ckpt, t, result.state, meta)
            records.append(record)
            writer.write_round(record)  # before the commit: a resume purges it, never loses it
            ckpt.save_state(
                {
                    "next_round": tol.round,
                    "tolerance": tol.to_dict(),
                    "strategy": strategy_state,
                    "wall_seconds": wall_before + time.monotonic() - start,
                }
            )
            progress.end_round(record)
        stop_reason = stop_reason or tol.reason
        wall = wall_before + time.monotonic() - start
        summary = _finish(config, workdir, data, mesh, tol, stop_reason, records, wall)
    if is_primary:
        print(progress_lib.summary_table(summary, records), file=stream or sys.stdout)
    return summary
