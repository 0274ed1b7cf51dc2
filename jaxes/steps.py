"""The pure functions of training: loss, optimizer, step, epoch, and the jitted host-driver step.

The functional boundary is ``nnx.split``: parameters and optimizer state are plain pytrees and
the steps are pure. The learning rate and weight decay are traced arguments (``Hyper``), never
part of a cache key, so searching them never recompiles. ``population`` builds the device
program of a whole round from these; ``train`` drives the host-streamed fallback.
"""

from __future__ import annotations

import dataclasses

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
    driver: str


@dataclasses.dataclass(frozen=True)
class Hyper:
    """The traced hyper-parameters of one instance (float32 scalars, or stacked per instance)."""

    learning_rate: jax.Array
    weight_decay: jax.Array

    @classmethod
    def of(cls, learning_rate, weight_decay) -> Hyper:
        return cls(jnp.asarray(learning_rate, jnp.float32), jnp.asarray(weight_decay, jnp.float32))


jax.tree_util.register_dataclass(
    Hyper, data_fields=["learning_rate", "weight_decay"], meta_fields=[]
)


def logits_of(model, images, key=None, gates=None):
    """``model.logits``, with a depth-padded bucket's ``gates`` (``padding.gates``) if any."""
    if gates is None:  # a registered backbone takes no gates
        return model.logits(images, key)
    return model.logits(images, key, gates)


def _loss_fn(graphdef, params, rest, images, labels, key, spec, gates):
    model = nnx.merge(graphdef, params, rest)
    logits = logits_of(model, data_lib.normalize(images, spec), key, gates)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def optimizer(hyper: Hyper) -> optax.GradientTransformation:
    """AdamW with traced learning rate and weight decay (its state does not depend on them)."""
    return optax.adamw(hyper.learning_rate, weight_decay=hyper.weight_decay)


def step(
    graphdef, h, batch_spec, hyper, mask, carry, images, labels, dropout_key, step_index,
    gates=None,
):  # fmt: skip
    """One AdamW step. ``mask`` (or None) keeps a padded instance's padding at zero; ``gates``
    (or None) are a depth-padded bucket's (``padding.gates``)."""
    params, opt_state, rest = carry
    if batch_spec is not None:
        images = jax.lax.with_sharding_constraint(images, batch_spec)
        labels = jax.lax.with_sharding_constraint(labels, batch_spec)
    key = jax.random.fold_in(dropout_key, step_index)
    loss, grads = jax.value_and_grad(_loss_fn, argnums=1)(
        graphdef, params, rest, images, labels, key, h.spec, gates
    )
    updates, opt_state = optimizer(hyper).update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    if mask is not None:
        params = jax.tree.map(jnp.multiply, params, mask)
    return (params, opt_state, rest), loss


def epoch_order(data_key, epoch: int, num_examples: int, h: HParams):
    """The (steps, batch) example indices of one epoch: a keyed permutation, remainder dropped."""
    perm = jax.random.permutation(keys.epoch_key(data_key, epoch), num_examples)
    return perm[: h.steps_per_epoch * h.batch_size].reshape(h.steps_per_epoch, h.batch_size)


def scan_epoch(
    graphdef, h, batch_spec, hyper, mask, carry, images, labels, keys2, epoch, gates=None
):
    """One epoch as a ``lax.scan`` over a keyed permutation of the on-device data.

    ``keys2`` is ``(data_key, dropout_key)``; returns the new carry and the mean train loss.
    """
    data_key, dropout_key = keys2
    order = epoch_order(data_key, epoch, images.shape[0], h)
    first = epoch * h.steps_per_epoch

    def body(carry, xs):
        index, offset = xs
        return step(
            graphdef, h, batch_spec, hyper, mask, carry, images[index], labels[index],
            dropout_key, offset, gates,
        )  # fmt: skip

    unroll = h.steps_per_epoch if h.driver == "unrolled" else 1
    steps = first + jnp.arange(h.steps_per_epoch)
    carry, losses = jax.lax.scan(body, carry, (order, steps), unroll=unroll)
    return carry, losses.mean()


# Any value < 0 passes the model's check; the round's own log-rate replaces it after init.
_PLACEHOLDER_LOG_RATE = -1.0


def init_instance(arch: models.Arch, input_shape: tuple, num_classes: int, key, log_rate):
    """``(params, log_rates)`` of a fresh ``arch`` instance (traceable in ``key``/``log_rate``)."""
    model = models.build(arch, input_shape, num_classes, key, _PLACEHOLDER_LOG_RATE)
    _, params, rates = nnx.split(model, nnx.Param, models.LogRate)
    return params, jax.tree.map(lambda x: jnp.full_like(x, log_rate), rates)


def graph_of(arch: models.Arch, input_shape: tuple, num_classes: int):
    """The graph of ``arch`` (no parameters allocated)."""
    return nnx.eval_shape(
        lambda: nnx.split(
            models.build(arch, input_shape, num_classes, jax.random.key(0), _PLACEHOLDER_LOG_RATE),
            nnx.Param,
            models.LogRate,
        )
    )[0]


def compiled_step(graphdef, h: HParams, mesh):
    """The jitted ``(init, step)`` of the host driver: batch on ``data``, the rest replicated.

    The optimizer init runs once per round, so it compiles for compile speed
    (``sharding.RUN_ONCE_CPU``).
    """
    rep = sharding.replicated(mesh)
    batch = sharding.batch_sharded(mesh)
    init = jax.jit(
        lambda params, hyper: optimizer(hyper).init(params),
        out_shardings=rep,
        compiler_options=sharding.run_once_options(mesh),
    )

    def host_step(carry, images, labels, dropout_key, step_index, hyper):
        return step(graphdef, h, batch, hyper, None, carry, images, labels, dropout_key, step_index)

    step_fn = jax.jit(
        host_step,
        in_shardings=(rep, batch, batch, rep, rep, rep),
        out_shardings=(rep, rep),
        donate_argnums=0,
    )
    return init, step_fn
