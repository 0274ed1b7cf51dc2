"""One round: train an instance to convergence (claim 1), on a ``("data",)`` mesh.

The compiled programs live in ``steps``; this module chooses how to drive them and when to stop.

Epoch drivers (a static choice, never timed at run time, so one config always runs one program):
  * ``scan``: data lives on the device; an epoch is one ``lax.scan`` over a keyed permutation,
    with no host round trip per step.
  * ``unrolled``: the same scan, fully unrolled: a fallback for ops that XLA:CPU runs slowly
    inside while loops (jax-ml/jax#12868); it compiles several times longer.
  * ``host``: a Python loop feeding host batches, prefetched on a thread, to a jitted step.
    Also used whenever the data does not fit ``device_memory_fraction`` of device memory: the
    batches and their order are the same for the same key.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from collections.abc import Callable
from queue import Queue

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxes import data as data_lib
from jaxes import infer, keys, models, sharding, steps, stopping

DRIVERS = ("scan", "unrolled", "host")

# Measured ahead of time by benchmarks/train_throughput.py (README, 2-core CPU): the fastest
# driver per (backbone, platform), counting compile time. Static on purpose (module docstring).
# CPU: scan runs the MLP at 2.8x and the CNN at 1.3x the plain host loop. The CNN scans fast
# only because models.Conv3x3 avoids XLA:CPU's conv kernels (#12868: 0.1x plain in a scan);
# unrolled never won and compiles 3-5x longer. Other platforms default to scan.
DRIVER_TABLE = {
    ("mlp", "cpu"): "scan",
    ("cnn", "cpu"): "scan",
}
DEFAULT_DRIVER = "scan"


@dataclasses.dataclass
class RoundResult:
    """The outcome of one round: the best epoch's instance and how it got there."""

    arch: models.Arch
    log_rate: float
    graphdef: nnx.GraphDef
    state: nnx.State | None  # params + LogRate of the best epoch; None if failed early
    metrics: dict  # val_loss, val_accuracy, train_loss of the best epoch
    history: list[dict]
    epochs: int
    best_epoch: int
    driver: str = DEFAULT_DRIVER  # the epoch driver that ran
    failed: bool = False
    message: str | None = None


def choose_driver(backbone: str, requested: str, platform: str) -> str:
    """The driver for ``requested`` ("auto" looks up the static table)."""
    if requested == "auto":
        return DRIVER_TABLE.get((backbone, platform), DEFAULT_DRIVER)
    if requested not in DRIVERS:
        raise ValueError(f"epoch_driver must be 'auto' or one of {DRIVERS}, got {requested!r}.")
    return requested


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


def host_epoch(step_fn, carry, split, data_key, dropout_key, epoch, h, mesh):
    """One epoch streamed from the host: batches gathered and placed on a prefetch thread."""
    order = np.asarray(steps.epoch_order(data_key, epoch, len(split.labels), h))
    batch = sharding.batch_sharded(mesh)

    def batches():
        for index in order:
            yield sharding.put(split.images[index], batch), sharding.put(split.labels[index], batch)

    losses = []
    for i, (images, labels) in enumerate(_prefetched(batches(), depth=2)):
        carry, loss = step_fn(carry, images, labels, dropout_key, epoch * h.steps_per_epoch + i)
        losses.append(loss)
    return carry, jnp.mean(jnp.stack(losses))


def fits_on_device(split: data_lib.Split, fraction: float, mesh) -> bool:
    """Whether a replicated copy of ``split`` fits ``fraction`` of each device's memory."""
    need = data_lib.nbytes(split)
    # Only this process's devices can be asked; every host of a run is assumed alike.
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    return need <= fraction * min(sharding.memory_bytes(d) for d in local)


def _copy(tree):
    return jax.tree.map(lambda x: jnp.array(x, copy=True), tree)


def to_convergence(
    arch: models.Arch,
    data: data_lib.Data,
    key: jax.Array,
    config,
    *,
    mesh=None,
    on_epoch: Callable[[int, dict], None] | None = None,
) -> RoundResult:
    """Trains one instance until validation loss stops improving (or ``max_epochs``).

    Convergence is the ``stopping`` machine with a fixed patience on validation loss (mode
    "min", no budget extension); the instance returned is the best epoch's.

    Args:
      arch: the architecture.
      data: train/validation splits and the input spec.
      key: the round key; its named streams (``keys.RoundKeys``) seed everything.
      config: the ``train`` section of the run config (see configs/digits.py).
      mesh: the device mesh (default: all devices).
      on_epoch: called after each epoch with (epoch, metrics).

    Returns:
      A RoundResult. A non-finite loss ends the round as failed, naming the epoch.
    """
    mesh = sharding.make_mesh() if mesh is None else mesh
    sharding.check_batch_size(config.batch_size, mesh)
    train_split = data.train
    steps_per_epoch = len(train_split.labels) // config.batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"batch_size={config.batch_size} exceeds the {len(train_split.labels)} training "
            "examples; lower train.batch_size."
        )
    driver = choose_driver(arch.backbone, config.epoch_driver, mesh.devices.flat[0].platform)
    if driver != "host" and not fits_on_device(train_split, config.device_memory_fraction, mesh):
        driver = "host"
    h = steps.HParams(
        spec=data.spec,
        batch_size=config.batch_size,
        steps_per_epoch=steps_per_epoch,
        learning_rate=config.learning_rate,
        weight_decay=config.weight_decay,
        driver=driver,
    )
    round_keys = keys.RoundKeys.of(key)
    log_rate = models.draw_log_rate(round_keys.dropout_rate, config.dropout_rate)
    graphdef, init_model = steps.initializer(arch, data.spec.shape, data.spec.num_classes, mesh)
    params, rest = init_model(round_keys.init, log_rate)
    init_fn, step_fn, epoch_fn = steps.compiled(graphdef, h, mesh)
    rep = sharding.replicated(mesh)
    carry = (params, init_fn(params), rest)
    if driver != "host":
        images = sharding.put(train_split.images, rep)
        labels = sharding.put(train_split.labels, rep)
    evaluator = infer.Evaluator(graphdef, data.spec, mesh, config.eval_batch_size)

    convergence = stopping.init(
        rounds=config.max_epochs,
        patience=config.patience,
        mode="min",
        min_delta=config.min_delta,
        extend=False,
    )
    history, best_state, best_metrics, best_epoch = [], None, {}, -1
    for epoch in range(config.max_epochs):
        if driver == "host":
            carry, train_loss = host_epoch(
                step_fn, carry, train_split, round_keys.data, round_keys.dropout, epoch, h, mesh
            )
        else:
            carry, train_loss = epoch_fn(
                carry, images, labels, round_keys.data, round_keys.dropout, epoch
            )
        val = evaluator.evaluate(nnx.merge_state(carry[0], carry[2]), data.validation)
        metrics = {"epoch": epoch, "train_loss": float(train_loss)}
        metrics.update({f"val_{k}": v for k, v in val.items()})
        history.append(metrics)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        bad = [k for k in ("train_loss", "val_loss") if not math.isfinite(metrics[k])]
        if bad:
            return RoundResult(
                arch, log_rate, graphdef, best_state, best_metrics, history, epoch + 1,
                best_epoch, driver, failed=True,
                message=f"{bad[0]} became {metrics[bad[0]]} at epoch {epoch}",
            )  # fmt: skip
        convergence = stopping.update(convergence, metrics["val_loss"])
        if convergence.improved:
            best_state = _copy(nnx.merge_state(carry[0], carry[2]))
            best_metrics = {k: v for k, v in metrics.items() if k != "epoch"}
            best_epoch = epoch
        if convergence.stopped:
            break
    return RoundResult(
        arch, log_rate, graphdef, best_state, best_metrics, history, len(history), best_epoch,
        driver,
    )  # fmt: skip
