"""The method (claim 1): rounds of search -> train to convergence -> judge, until the tolerance.

``run(config, workdir)`` is the whole job, with nothing global. Rounds go in generations of
``K = config.parallel.rounds`` (docs/design.md §6b): the strategy proposes K architectures (claim 6)
from its state after the previous generation, one engine call trains all K to convergence (claims
1-2), and the tolerance (claims 1, 3-5) judges the results in round order; rounds after a stop
inside a generation are discarded (counted, never the best). Then, atomically: the generation's
records, its best instance (Orbax) and the resume state, whose replacement is the commit. Re-running
on the same workdir resumes at the last committed generation and ends exactly as an uninterrupted
run would: every round's randomness is a pure function of (seed, round index). K = 1 is one round
per generation.
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
    plot,
    search,
    sharding,
    tboard,
    vis,
)
from jaxes import data as data_lib
from jaxes import guard as guard_lib
from jaxes import progress as progress_lib
from jaxes import train as train_lib
from jaxes import workdir as workdir_lib
from jaxes.runconfig import (
    check_batch_size,
    check_config,
    make_strategy,
    make_tolerance,
    split_choice,
    tolerance_rule,
)


def _round_record(t, choice, result, tol, config, round_key, seconds, generation) -> dict:
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
        "bucket": result.bucket.short() if result.bucket else None,
        "generation": generation,
        "learning_rate": result.learning_rate,
        "weight_decay": result.weight_decay,
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


def _hparams(train_config, result) -> dict:
    """The training hyper-parameters of a round, as recorded with its instance (the learning rate
    and weight decay are the round's own: the search may set them)."""
    names = ("batch_size", "max_epochs", "patience")
    return {
        "learning_rate": result.learning_rate,
        "weight_decay": result.weight_decay,
        **{name: train_config[name] for name in names},
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


def _finish(config, workdir, data, mesh, tol, stop_reason, records, wall_seconds, discarded):
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
        "population": config.parallel.rounds,
        "rounds_discarded": discarded,
        "wall_seconds": wall_seconds,
    }
    if tol.best_round is not None:
        # Restored straight onto the mesh, replicated, as the evaluator's programs take it.
        rep = sharding.replicated(mesh)
        model, meta = instance.load(workdir, round_index=tol.best_round, sharding=rep)
        graphdef, state = nnx.split(model)
        evaluator = infer.Evaluator(graphdef, data.spec, mesh, config.train.eval_batch_size)
        test = evaluator.evaluate(state, data.test)
        summary["test_accuracy"], summary["test_loss"] = test["accuracy"], test["loss"]
        summary["test_metric"] = test[config.metric.removeprefix("val_")]
        summary["best_arch"] = meta.arch
        if config.knn:
            train_emb = evaluator.embed(state, data.train.images)
            test_emb = evaluator.embed(state, data.test.images)
            knn_start = time.perf_counter()
            summary["knn_top1"] = infer.knn_top1(
                train_emb, data.train.labels, test_emb, data.test.labels
            )
            summary["knn_seconds"] = time.perf_counter() - knn_start
            if config.plots and jax.process_index() == 0:  # neighbors.png and embedding.png
                vis.write_plots(workdir, data, train_emb, test_emb)
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
        data = data_lib.load_config(config)
        mesh = sharding.make_mesh(population=config.parallel.rounds)
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


def _propose(strategy, strategy_state, root, first: int, size: int, *, ahead: bool = False):
    """Up to ``size`` proposals for rounds ``first, first + 1, ...``; stops early if exhausted.

    ``ahead``: proposals for a generation whose predecessor is still pending, only as far as the
    strategy ``sees_ahead`` (exactly what it will propose then, whatever the pending outcomes).

    Returns:
      ``(proposals, strategy_state, exhausted)``, proposals as ``(round_index, choice, key)``.
    """
    proposals = []
    for t in range(first, first + size):
        if ahead and not strategy.sees_ahead(strategy_state):
            break
        round_key = keys.round_key(root, t)
        try:
            choice, strategy_state = strategy.propose(
                strategy_state, keys.RoundKeys.of(round_key).arch
            )
        except search.Exhausted:
            return proposals, strategy_state, True
        proposals.append((t, choice, round_key))
    return proposals, strategy_state, False


def _jobs(proposals, train_config) -> list[train_lib.Job]:
    jobs = []
    for _, choice, round_key in proposals:
        arch, learning_rate, weight_decay = split_choice(choice, train_config)
        jobs.append(train_lib.Job(arch, round_key, learning_rate, weight_decay))
    return jobs


def _run(config, workdir, data, mesh, strategy, run_guard, *, stream, live) -> dict:
    """The generation loop of ``run``, once the workdir is this process's to write."""
    is_primary = jax.process_index() == 0
    population = config.parallel.rounds
    rule = tolerance_rule(config)  # stopping (the patent's) or gain: one protocol
    workdir_lib.claim(workdir, config, write=is_primary)
    workdir_lib.claim_data(workdir, data.identity(), write=is_primary)
    root = keys.root(config.seed)
    ckpt = checkpoint.Checkpointer(Path(workdir) / files.CHECKPOINTS, is_primary=is_primary)
    state, records = _resume(ckpt, workdir, is_primary)
    if state is None:
        tol = make_tolerance(config, root)
        strategy_state, wall_before, discarded = strategy.init(), 0.0, 0
    else:
        tol = rule.State.from_dict(state["tolerance"])
        strategy_state, wall_before = state["strategy"], state["wall_seconds"]
        discarded = state.get("rounds_discarded", 0)
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
    # Every round is also an HParams session; on resume exactly the committed rounds have one.
    sessions = tboard.Sessions(Path(workdir) / files.TENSORBOARD, enabled=is_primary)
    sessions.sync(records)
    engine = train_lib.Engine(
        data,
        config.train,
        mesh=mesh,
        space=strategy.space,
        pad_backbones=tuple(config.parallel.pad_backbones),
        depth_backbones=tuple(config.parallel.pad_depth_backbones),
        # Per-epoch progress is a host callback inside the programs, and a callback keys the
        # persistent compilation cache by process: off by default, so reruns compile nothing.
        on_epoch=(lambda job, epoch, loss: progress.epoch(epoch, loss))
        if config.train.epoch_progress
        else None,
    )
    with progress, writer, ckpt:
        while not tol.stopped and stop_reason is None:
            first = run_guard.round_index = tol.round
            generation_start = time.monotonic()
            # A generation never proposes past the current budget (it can only grow).
            proposals, strategy_state, exhausted = _propose(
                strategy, strategy_state, root, first, min(population, tol.rounds - first)
            )
            if not proposals:
                stop_reason = "search_exhausted"
                break
            progress.start_round(first, tol.rounds, patience=tol.patience)
            # The next generation's programs compile while this one trains, where the strategy
            # knows its proposals already (random and fixed search; evolution's first members).
            nxt = first + len(proposals)
            upcoming, _, _ = _propose(
                strategy, strategy_state, root, nxt, min(population, tol.rounds - nxt), ahead=True
            )
            jobs, upcoming = _jobs(proposals, config.train), _jobs(upcoming, config.train)
            with progress.ticking():
                results = engine.train(jobs, upcoming)
            seconds = (time.monotonic() - generation_start) / len(proposals)
            new_records, best_save = [], None
            for (t, choice, round_key), result in zip(proposals, results, strict=True):
                if tol.stopped:  # a stop inside the generation: the later rounds are discarded
                    discarded += 1
                    continue
                metric = math.nan if result.failed else result.metrics[config.metric]
                fitness = None if result.failed else (metric if config.mode == "max" else -metric)
                strategy_state = strategy.observe(strategy_state, choice, fitness, t)
                tol = rule.update(tol, metric)
                record = _round_record(
                    t, choice, result, tol, config, round_key, seconds, first // population
                )
                new_records.append(record)
                if tol.improved:
                    best_save = (t, result)
            for record in new_records:
                if is_primary:
                    workdir_lib.append_round(workdir, record)
                records.append(record)
                writer.write_round(record)  # before the commit: a resume purges it, never loses it
                sessions.write(record)  # likewise: a resume's sync drops it
            if best_save is not None:
                t, result = best_save
                meta = instance.Meta(
                    round_index=t,
                    arch=result.arch.to_dict(),
                    input_spec=data.spec.to_dict(),
                    log_rate=result.log_rate,
                    metrics=result.metrics,
                    metric=config.metric,
                    dataset=config.dataset,
                    hparams=_hparams(config.train, result),
                    class_names=list(data.class_names) if data.class_names else None,
                )
                instance.save(ckpt, result.state, meta)
            ckpt.save_state(
                {
                    "next_round": tol.round,
                    "tolerance": tol.to_dict(),
                    "strategy": strategy_state,
                    "wall_seconds": wall_before + time.monotonic() - start,
                    "rounds_discarded": discarded,
                }
            )
            run_guard.round_index = tol.round  # committed: a stop now is in the next generation
            for record in new_records:
                progress.end_round(record)
            if exhausted and not tol.stopped:
                stop_reason = "search_exhausted"
        stop_reason = stop_reason or tol.reason
        wall = wall_before + time.monotonic() - start
        summary = _finish(config, workdir, data, mesh, tol, stop_reason, records, wall, discarded)
    if is_primary:
        print(progress_lib.summary_table(summary, records), file=stream or sys.stdout)
    return summary
