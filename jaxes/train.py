"""One round: train an instance to convergence (claim 1), on a ``("data",)`` mesh.

The functional boundary is ``nnx.split``: parameters and optimizer state are plain pytrees, the
steps are pure and compiled once per (graph, hyper-parameters, mesh), buffers are donated.

Epoch drivers (a static choice, never timed at run time, so one config always runs one program):
  * ``scan``: data lives on the device; an epoch is one ``lax.scan`` over a keyed permutation.
  * ``unrolled``: the same scan, fully unrolled (XLA:CPU runs conv weight gradients slowly
    inside while loops, jax-ml/jax#12868).
  * ``host``: a Python loop feeding host batches (prefetched) to a jitted step. Used when the
    data does not fit ``device_memory_fraction`` of device memory; same batches, same order.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import threading
from collections.abc import Callable
from queue import Queue

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxes import data as data_lib
from jaxes import infer, keys, models, sharding, stopping

DRIVERS = ("scan", "unrolled", "host")

# Measured ahead of time by benchmarks/train_throughput.py (README): which driver is fastest
# per (backbone, platform). Static on purpose; see the module docstring.
DRIVER_TABLE = {
    ("mlp", "cpu"): "scan",
    ("cnn", "cpu"): "unrolled",
}
DEFAULT_DRIVER = "scan"


@dataclasses.dataclass(frozen=True)
class HParams:
    """Everything static about the compiled steps (hashable: part of the compile cache key)."""

    spec: data_lib.InputSpec
    batch_size: int
    steps_per_epoch: int
    learning_rate: float
    weight_decay: float
    driver: str


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

    def model(self) -> models.Model:
        return nnx.merge(self.graphdef, self.state)


def choose_driver(backbone: str, requested: str, platform: str) -> str:
    """The driver for ``requested`` ("auto" looks up the static table)."""
    if requested == "auto":
        return DRIVER_TABLE.get((backbone, platform), DEFAULT_DRIVER)
    if requested not in DRIVERS:
        raise ValueError(f"epoch_driver must be 'auto' or one of {DRIVERS}, got {requested!r}.")
    return requested


def _loss_fn(graphdef, params, rest, images, labels, key, spec):
    model = nnx.merge(graphdef, params, rest)
    logits = model.logits(data_lib.normalize(images, spec), key)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def _optimizer(h: HParams):
    return optax.adamw(h.learning_rate, weight_decay=h.weight_decay)


def _step(graphdef, h, mesh, carry, images, labels, dropout_key, step):
    params, opt_state, rest = carry
    images = jax.lax.with_sharding_constraint(images, sharding.batch_sharded(mesh))
    labels = jax.lax.with_sharding_constraint(labels, sharding.batch_sharded(mesh))
    key = jax.random.fold_in(dropout_key, step)
    loss, grads = jax.value_and_grad(_loss_fn, argnums=1)(
        graphdef, params, rest, images, labels, key, h.spec
    )
    updates, opt_state = _optimizer(h).update(grads, opt_state, params)
    return (optax.apply_updates(params, updates), opt_state, rest), loss


def epoch_order(data_key, epoch: int, num_examples: int, h: HParams):
    """The (steps, batch) example indices of one epoch: a keyed permutation, remainder dropped."""
    perm = jax.random.permutation(keys.epoch_key(data_key, epoch), num_examples)
    return perm[: h.steps_per_epoch * h.batch_size].reshape(h.steps_per_epoch, h.batch_size)


def _scan_epoch(graphdef, h, mesh, carry, images, labels, data_key, dropout_key, epoch):
    order = epoch_order(data_key, epoch, images.shape[0], h)
    first = epoch * h.steps_per_epoch

    def body(carry, xs):
        index, offset = xs
        return _step(graphdef, h, mesh, carry, images[index], labels[index], dropout_key, offset)

    unroll = h.steps_per_epoch if h.driver == "unrolled" else 1
    steps = first + jnp.arange(h.steps_per_epoch)
    carry, losses = jax.lax.scan(body, carry, (order, steps), unroll=unroll)
    return carry, losses.mean()


# Any value < 0 passes the model's check; the round's own log-rate replaces it after init.
_PLACEHOLDER_LOG_RATE = -1.0


@functools.lru_cache(maxsize=64)
def initializer(arch: models.Arch, input_shape: tuple, num_classes: int, mesh):
    """The graph of ``arch`` and a jitted ``init(key, log_rate) -> (params, log_rates)``.

    One compiled init per architecture, instead of one eager compile per parameter shape.
    """

    def split(key):
        model = models.build(arch, input_shape, num_classes, key, _PLACEHOLDER_LOG_RATE)
        return nnx.split(model, nnx.Param, models.LogRate)

    graphdef = nnx.eval_shape(lambda: split(jax.random.key(0)))[0]

    @functools.partial(jax.jit, out_shardings=sharding.replicated(mesh))
    def init(key, log_rate):
        _, params, rates = split(key)
        return params, jax.tree.map(lambda x: jnp.full_like(x, log_rate), rates)

    return graphdef, init


@functools.lru_cache(maxsize=64)
def compiled(graphdef, h: HParams, mesh):
    """The jitted init/step/epoch functions of one (graph, hyper-parameters, mesh)."""
    rep = sharding.replicated(mesh)
    batch = sharding.batch_sharded(mesh)
    init = jax.jit(lambda params: _optimizer(h).init(params), out_shardings=rep)
    step = jax.jit(
        functools.partial(_step, graphdef, h, mesh),
        in_shardings=(rep, batch, batch, rep, rep),
        out_shardings=(rep, rep),
        donate_argnums=0,
    )
    epoch = jax.jit(
        functools.partial(_scan_epoch, graphdef, h, mesh),
        in_shardings=(rep, rep, rep, rep, rep, rep),
        out_shardings=(rep, rep),
        donate_argnums=0,
    )
    return init, step, epoch


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


def _host_epoch(step_fn, carry, split, data_key, dropout_key, epoch, h, mesh):
    """One epoch streamed from the host: batches gathered and placed on a prefetch thread."""
    order = np.asarray(epoch_order(data_key, epoch, len(split.labels), h))
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
    need = split.images.nbytes + split.labels.nbytes
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
    steps = len(train_split.labels) // config.batch_size
    if steps < 1:
        raise ValueError(
            f"batch_size={config.batch_size} exceeds the {len(train_split.labels)} training "
            "examples; lower train.batch_size."
        )
    driver = choose_driver(arch.backbone, config.epoch_driver, mesh.devices.flat[0].platform)
    if driver != "host" and not fits_on_device(train_split, config.device_memory_fraction, mesh):
        driver = "host"
    h = HParams(
        data.spec, config.batch_size, steps, config.learning_rate, config.weight_decay, driver
    )
    round_keys = keys.RoundKeys.of(key)
    log_rate = models.draw_log_rate(round_keys.dropout_rate, config.dropout_rate)
    graphdef, init_model = initializer(arch, data.spec.shape, data.spec.num_classes, mesh)
    params, rest = init_model(round_keys.init, log_rate)
    init_fn, step_fn, epoch_fn = compiled(graphdef, h, mesh)
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
            carry, train_loss = _host_epoch(
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
