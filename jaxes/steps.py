"""The compiled programs of one round: init, train step and scan epoch (pure functions).

The functional boundary is ``nnx.split``: parameters and optimizer state are plain pytrees, the
steps are pure and compiled once per (graph, hyper-parameters, mesh) with explicit shardings
(batch on ``data``, everything else replicated) and donated buffers. ``train`` drives them.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from jaxes import data as data_lib
from jaxes import keys, models, sharding


@dataclasses.dataclass(frozen=True)
class HParams:
    """Everything static about the compiled steps (hashable: part of the compile cache key)."""

    spec: data_lib.InputSpec
    batch_size: int
    steps_per_epoch: int
    learning_rate: float
    weight_decay: float
    driver: str


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
