"""The host-streamed round: for data that does not fit on the device (``train`` picks it).

A Python loop over epochs feeds host batches, gathered and placed on a prefetch thread, to a
jitted step; validation runs through ``infer.Evaluator`` and convergence through ``stopping``
itself. The batches and their order are those of the device program for the same key
(``steps.epoch_order``), so only the float summation order differs.
"""

from __future__ import annotations

import math
import threading
from queue import Queue

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxes import data as data_lib
from jaxes import infer, keys, padding, population, sharding, steps, stopping


def _prefetched(batches, depth: int):
    """Runs the ``batches`` generator on a thread, ``depth`` items ahead of the consumer."""
    queue: Queue = Queue(maxsize=depth)
    done = object()

    def produce():
        try:
            for item in batches:
                queue.put(item)
        except BaseException as e:  # re-raised in the consumer
            queue.put(e)
        queue.put(done)

    threading.Thread(target=produce, daemon=True).start()
    while (item := queue.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def host_epoch(step_fn, carry, split, round_keys, epoch, h, mesh, hyper):
    """One epoch streamed from the host: batches gathered and placed on a prefetch thread."""
    order = np.asarray(steps.epoch_order(round_keys.data, epoch, len(split.labels), h))
    batch = sharding.batch_sharded(mesh)

    def batches():
        for index in order:
            yield sharding.put(split.images[index], batch), sharding.put(split.labels[index], batch)

    losses = []
    for i, (images, labels) in enumerate(_prefetched(batches(), depth=2)):
        step_index = epoch * h.steps_per_epoch + i
        carry, loss = step_fn(carry, images, labels, round_keys.dropout, step_index, hyper)
        losses.append(loss)
    return carry, jnp.mean(jnp.stack(losses))


def _copy(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def to_convergence(job, log_rate: float, data: data_lib.Data, config, mesh, programs, on_epoch):
    """Trains ``job`` to convergence from the host; returns the fields of a ``RoundResult``.

    Args:
      job: the ``train.Job``.
      log_rate: its dropout log-rate.
      data: the splits.
      config: the ``train`` config section.
      mesh: the mesh (batches on ``data``).
      programs: a dict the run owns, caching compiled steps per (graph, static settings).
      on_epoch: ``on_epoch(epoch, val_loss)`` after each epoch, or None.

    Returns:
      A dict of ``RoundResult`` fields.
    """
    arch, train_split = job.arch, data.train
    h = steps.HParams(
        spec=data.spec,
        batch_size=config.batch_size,
        steps_per_epoch=len(train_split.labels) // config.batch_size,
        driver="host",
    )
    round_keys = keys.RoundKeys.of(job.key)
    shape, classes = data.spec.shape, data.spec.num_classes
    cache_key = ("host", arch, h, mesh)
    one = jax.sharding.Mesh(mesh.devices[:1, :1], mesh.axis_names)  # init: a population of 1
    if cache_key not in programs:
        graphdef = steps.graph_of(arch, shape, classes)
        init_model = population.init_program(arch, shape, classes, one)
        programs[cache_key] = (graphdef, init_model, *steps.compiled_step(graphdef, h, mesh))
    graphdef, init_model, init_fn, step_fn = programs[cache_key]
    rep = sharding.replicated(mesh)
    hyper = sharding.put_tree(steps.Hyper.of(job.learning_rate, job.weight_decay), rep)
    # The device program's init, so both drivers start from the same parameters.
    raw = np.asarray(jax.random.key_data(round_keys.init))[None]
    params, rest, _ = init_model(raw, np.asarray([log_rate], np.float32),
                                 padding.RealSizes.of([arch]))  # fmt: skip
    params, rest = (
        sharding.put_tree(jax.tree.map(lambda x: np.asarray(x)[0], tree), rep)
        for tree in (params, rest)
    )
    carry = (params, init_fn(params, hyper), rest)
    evaluator = infer.Evaluator(graphdef, data.spec, mesh, config.eval_batch_size)
    convergence = stopping.init(
        rounds=config.max_epochs,
        patience=config.patience,
        mode="min",
        min_delta=config.min_delta,
        extend=False,
    )
    history, best_state, best_metrics, best_epoch = [], None, {}, -1
    failed, message = False, None
    for epoch in range(config.max_epochs):
        carry, train_loss = host_epoch(
            step_fn, carry, train_split, round_keys, epoch, h, mesh, hyper
        )
        val = evaluator.evaluate(nnx.merge_state(carry[0], carry[2]), data.validation)
        metrics = {"epoch": epoch, "train_loss": float(train_loss)}
        metrics.update({f"val_{k}": v for k, v in val.items()})
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(epoch, metrics["val_loss"])
        bad = [k for k in ("train_loss", "val_loss") if not math.isfinite(metrics[k])]
        if bad:
            failed, message = True, f"{bad[0]} became {metrics[bad[0]]} at epoch {epoch}"
            break
        convergence = stopping.update(convergence, metrics["val_loss"])
        if convergence.improved:
            best_state = _copy(nnx.merge_state(carry[0], carry[2]))
            best_metrics = {k: v for k, v in metrics.items() if k != "epoch"}
            best_epoch = epoch
        if convergence.stopped:
            break
    return {
        "graphdef": graphdef,
        "state": best_state,
        "metrics": best_metrics,
        "history": history,
        "epochs": len(history),
        "best_epoch": best_epoch,
        "failed": failed,
        "message": message,
    }


def fits_on_device(split: data_lib.Split, fraction: float, mesh) -> bool:
    """Whether a replicated copy of ``split`` fits ``fraction`` of every device's memory.

    Each process can only ask its own devices, and hosts may differ, so the answer of process 0
    is broadcast: every host then compiles the same program.
    """
    need = data_lib.nbytes(split)
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    fits = need <= fraction * min(sharding.memory_bytes(d) for d in local)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        fits = bool(multihost_utils.broadcast_one_to_all(np.asarray(fits)))
    return fits
