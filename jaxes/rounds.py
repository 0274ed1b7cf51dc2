"""The method (claim 1): rounds of search -> train to convergence -> judge, until the tolerance.

``run(config, workdir)`` is the whole job, with nothing global: per round ``t`` it proposes an
architecture (claim 6), trains an instance to convergence (claims 1-2), updates the tolerance
state (claims 1, 3-5) and, atomically, records the round, saves the best instance (Orbax) and
commits the resume state. Re-running on the same workdir resumes and ends exactly as an
uninterrupted run would: every round's randomness is a pure function of (seed, round index).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from pathlib import Path

import jax
from flax import nnx

from jaxes import (
    checkpoint,
    files,
    infer,
    instance,
    keys,
    models,
    plot,
    search,
    sharding,
    stopping,
    tboard,
)
from jaxes import data as data_lib
from jaxes import guard as guard_lib
from jaxes import progress as progress_lib
from jaxes import train as train_lib
from jaxes import workdir as workdir_lib
from jaxes.runconfig import check_batch_size, check_config, make_strategy, make_tolerance


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
        "wall_seconds": seconds,
    }


def _hparams(train_config) -> dict:
    """The training hyper-parameters of a round, as recorded with its instance."""
    names = ("learning_rate", "weight_decay", "batch_size", "max_epochs", "patience")
    return {name: train_config[name] for name in names}


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
        summary["best_arch"] = meta.arch
        if config.knn:
            summary["knn_top1"] = infer.knn_top1(
                evaluator.embed(state, data.train.images),
                data.train.labels,
                evaluator.embed(state, data.test.images),
                data.test.labels,
            )
    if jax.process_index() == 0:
        plot.plot_rounds(
            records,
            Path(workdir) / files.PLOT,
            metric_name=config.metric,
            mode=config.mode,
            stop_reason=stop_reason,
        )
        workdir_lib.write_summary(workdir, summary)  # last: its presence means "finished"
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

    Raises:
      guard.Interrupted: SIGINT or SIGTERM arrived; the workdir resumes like after a kill.
      guard.DiskFull: the workdir's disk filled up; every committed round is kept.
      workdir.WorkdirError: the workdir is a file, another config's, or in use by a live run.
    """
    check_config(config)
    is_primary = jax.process_index() == 0
    out = stream or sys.stderr
    with guard_lib.Guard(workdir) as run_guard:
        if workdir_lib.check(workdir, config) and workdir_lib.read_summary(workdir) is not None:
            # Finished: reading only, so a read-only (archived, shared) workdir still reports.
            return _already_finished(workdir, out if is_primary else None, stream)
        data = data_lib.load(config.dataset, config.data_dir or None)
        mesh = sharding.make_mesh()
        check_batch_size(config, data, mesh)
        strategy = make_strategy(config)
        if is_primary and (warning := progress_lib.space_warning(config, strategy)):
            print(warning, file=out)
        # One writer per workdir: the lock is held until the run ends or its process dies.
        with workdir_lib.lock(workdir) if is_primary else contextlib.nullcontext():
            return _run(config, workdir, data, mesh, strategy, run_guard, stream=stream, live=live)


def _already_finished(workdir, out, stream) -> dict:
    summary = workdir_lib.read_summary(workdir)
    if out is not None:
        print(progress_lib.finished_message(summary), file=out)
        table = progress_lib.summary_table(summary, workdir_lib.read_rounds(workdir))
        print(table, file=stream or sys.stdout)
    return summary


def _run(config, workdir, data, mesh, strategy, run_guard, *, stream, live) -> dict:
    """The round loop of ``run``, once the workdir is this process's to write."""
    is_primary = jax.process_index() == 0
    workdir_lib.claim(workdir, config, write=is_primary)
    root = keys.root(config.seed)
    ckpt = checkpoint.Checkpointer(Path(workdir) / files.CHECKPOINTS, is_primary=is_primary)
    state, records = _resume(ckpt, workdir, is_primary)
    if state is None:
        tol = make_tolerance(config, root)
        strategy_state, wall_before = strategy.init(), 0.0
    else:
        tol = stopping.State.from_dict(state["tolerance"])
        strategy_state, wall_before = state["strategy"], state["wall_seconds"]
    ckpt.keep_only(tol.best_round)  # exactly the committed best stays on disk
    run_guard.round_index = tol.round
    stop_reason = None

    start = time.monotonic()
    progress = progress_lib.Progress(stream=stream or sys.stderr, live=live, enabled=is_primary)
    progress.resume(records)
    if is_primary:
        print(progress_lib.start_message(tol, resumed=state is not None), file=stream or sys.stderr)
    # On resume, drop TensorBoard events past the committed round (a kill may have left them).
    writer = tboard.ScalarWriter(
        Path(workdir) / files.TENSORBOARD,
        enabled=is_primary,
        purge_step=tol.round if state else None,
    )
    with progress, writer, ckpt:
        while not tol.stopped and stop_reason is None:
            t = run_guard.round_index = tol.round
            round_start = time.monotonic()
            round_key = keys.round_key(root, t)
            try:
                choice, pending = strategy.propose(
                    strategy_state, keys.RoundKeys.of(round_key).arch
                )
            except search.Exhausted:
                stop_reason = "search_exhausted"
                break
            progress.start_round(t, tol.rounds, patience=tol.patience)
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
            tol = stopping.update(tol, metric)
            record = _round_record(
                t, choice, result, tol, config, round_key, time.monotonic() - round_start
            )
            if is_primary:
                workdir_lib.append_round(workdir, record)
            if tol.improved:
                meta = instance.Meta(
                    round_index=t,
                    arch=choice,
                    input_spec=data.spec.to_dict(),
                    log_rate=result.log_rate,
                    metrics=result.metrics,
                    metric=config.metric,
                    dataset=config.dataset,
                    hparams=_hparams(config.train),
                )
                instance.save(ckpt, result.state, meta)
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
            run_guard.round_index = tol.round  # round t is committed: a stop now is in the next
            progress.end_round(record)
        stop_reason = stop_reason or tol.reason
        wall = wall_before + time.monotonic() - start
        summary = _finish(config, workdir, data, mesh, tol, stop_reason, records, wall)
    if is_primary:
        print(progress_lib.summary_table(summary, records), file=stream or sys.stdout)
    return summary
