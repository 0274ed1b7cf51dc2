"""A population of instances trained to convergence in one device program (docs/design.md §6b).

``program(...)`` compiles, for one bucket architecture and one population size ``K``, the whole
of a round for ``K`` instances at once: ``vmap`` over instances (each with its own keys,
hyper-parameters, dropout rate and real sizes) of a ``lax.while_loop`` over epochs. An epoch is a
``lax.scan`` of steps over the on-device data, then a validation pass on the device, then the
convergence rule in ``jnp`` (``patience_rule``, equal to ``stopping`` with a fixed patience on
validation loss). The best epoch's parameters are kept on the device; a finished instance is
frozen (``vmap`` of a while loop selects its carry) while the others go on. Instances sit on the
mesh's ``rounds`` axis and each one's batch on its ``data`` axis.

Progress leaves the device through ``jax.debug.callback`` once per epoch, so a live line moves
during long rounds; it never feeds back into the computation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from jaxes import data as data_lib
from jaxes import padding, sharding, steps

# Columns of the per-epoch history a program returns.
# ``val_hits`` is the count of correct validation predictions (exact in float32 below 2^24), so
# the host divides in float64 and accuracies equal ``infer.Evaluator``'s to the last bit.
HISTORY = ("train_loss", "val_loss", "val_hits")


@dataclasses.dataclass(frozen=True)
class Static:
    """Everything static about a population program (hashable: its cache key, with the bucket)."""

    hparams: steps.HParams
    max_epochs: int
    patience: int
    min_delta: float
    eval_batch_size: int


def patience_rule(best, streak, epoch, loss, *, patience, min_delta, max_epochs):
    """One epoch of the convergence rule on validation loss, in ``jnp``.

    Exactly ``stopping.update`` on ``stopping.init(rounds=max_epochs, patience=patience,
    mode="min", min_delta=min_delta, extend=False)``: ``best`` is ``+inf`` before the first finite
    loss; a loss below ``best - min_delta`` is a new best; one not above the best (a tie) resets
    the streak (claim 4); any other loss, non-finite ones too, adds to it. The rounding is that
    of float32, identical to float64 for ``min_delta == 0`` (tests/test_population.py). XLA
    flushes float32 subnormals to zero, so a loss computed on the device is never subnormal; one
    fed from the host compares as 0.

    Returns:
      ``(best, streak, improved, stopped)``.
    """
    finite = jnp.isfinite(loss)
    improved = finite & (loss < best - min_delta)
    not_below = finite & (loss <= best)
    streak = jnp.where(improved | not_below, 0, streak + 1)
    best = jnp.where(improved, loss, best)
    stopped = (streak >= patience) | (epoch + 1 >= max_epochs)
    return best, streak, improved, stopped


def _evaluate(graphdef, spec, eval_batch, params, rest, images, labels, mask, gates=None):
    """Mean loss and the count of correct predictions over the (padded, masked) validation set;
    ``gates``: a depth-padded bucket's (``padding.gates``)."""
    chunks = images.shape[0] // eval_batch
    shape = (chunks, eval_batch)

    def body(totals, xs):
        x, y, m = xs
        model = nnx.merge(graphdef, params, rest)
        logits = steps.logits_of(model, data_lib.normalize(x, spec), gates=gates)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
        hits = jnp.argmax(logits, axis=-1) == y
        return (
            totals[0] + jnp.sum(jnp.where(m, losses, 0.0)),
            totals[1] + jnp.sum(jnp.where(m, hits, 0)),
        ), None

    xs = (
        images.reshape(*shape, *images.shape[1:]),
        labels.reshape(shape),
        mask.reshape(shape),
    )
    (loss, hits), _ = jax.lax.scan(body, (jnp.float32(0), jnp.int32(0)), xs)
    return loss / jnp.sum(mask), hits


def _train_one(graphdef, st: Static, batch_spec, report, gated, lane):
    """The to-convergence function of one instance (vmapped by ``program``)."""
    h = st.hparams
    params, rest, mask, hyper, raw_keys, active, index = lane
    gates = padding.gates(mask) if gated else None
    data_key, dropout_key = (jax.random.wrap_key_data(raw_keys[i]) for i in range(2))

    def run(images, labels, val_images, val_labels, val_mask):
        opt_state = steps.optimizer(hyper).init(params)
        history = jnp.full((st.max_epochs, len(HISTORY)), jnp.nan, jnp.float32)
        init = {
            "epoch": jnp.int32(0),
            "carry": (params, opt_state, rest),
            "best_params": params,
            "best": jnp.float32(jnp.inf),
            "streak": jnp.int32(0),
            "best_epoch": jnp.int32(-1),
            "done": ~active,
            "failed": jnp.bool_(False),
            "history": history,
        }

        def body(c):
            epoch = c["epoch"]
            carry, train_loss = steps.scan_epoch(
                graphdef, h, batch_spec, hyper, mask, c["carry"], images, labels,
                (data_key, dropout_key), epoch, gates,
            )  # fmt: skip
            val_loss, val_hits = _evaluate(
                graphdef, h.spec, st.eval_batch_size, carry[0], carry[2],
                val_images, val_labels, val_mask, gates,
            )  # fmt: skip
            bad = ~(jnp.isfinite(train_loss) & jnp.isfinite(val_loss))
            best, streak, improved, stopped = patience_rule(
                c["best"], c["streak"], epoch, val_loss,
                patience=st.patience, min_delta=st.min_delta, max_epochs=st.max_epochs,
            )  # fmt: skip
            improved = improved & ~bad
            if report is not None:
                jax.debug.callback(report, index, epoch, val_loss, ~c["done"])
            row = jnp.stack([train_loss, val_loss, val_hits.astype(jnp.float32)])
            return {
                "epoch": epoch + 1,
                "carry": carry,
                "best_params": jax.tree.map(
                    lambda new, old: jnp.where(improved, new, old), carry[0], c["best_params"]
                ),
                "best": best,
                "streak": streak,
                "best_epoch": jnp.where(improved, epoch, c["best_epoch"]),
                "done": stopped | bad,
                "failed": bad,
                "history": c["history"].at[epoch].set(row),
            }

        out = jax.lax.while_loop(lambda c: ~c["done"], body, init)
        return {
            "params": out["best_params"],
            "rest": rest,
            "best_epoch": out["best_epoch"],
            "epochs": out["epoch"],
            "failed": out["failed"],
            "history": out["history"],
        }

    return run


def program(
    graphdef, st: Static, mesh, report: Callable | None = None, gated: bool = False
) -> Callable[..., dict]:
    """The jitted population program of one bucket graph.

    Args:
      graphdef: the bucket architecture's graph.
      st: the static settings.
      mesh: the ``("rounds", "data")`` mesh; the population size must divide over ``rounds``.
      report: called as ``report(instance_index, epoch, val_loss, live)`` after every epoch
        (host side; numpy values, batched or not); ``live`` is False for a frozen instance.
      gated: the bucket's depth pads (``padding.skips_blocks``): each instance skips the
        blocks beyond its own depth (``padding.gates``).

    Returns:
      ``fn(lanes, images, labels, val_images, val_labels, val_mask) -> outputs`` where ``lanes``
      is the tuple ``(params, rest, mask, hyper, raw_keys, active, index)`` (``raw_keys``: the
      ``key_data`` of the data and dropout keys, shape (K, 2, ...)) with a
      leading instance axis, and ``outputs`` a dict of the same leading axis (replicated).
    """
    batch_spec = NamedSharding(mesh, PartitionSpec(sharding.AXIS))
    pop = sharding.population_sharded(mesh)
    rep = sharding.replicated(mesh)

    # Named for XLA's compile logs and jax.monitoring: "jit(round_program)".
    def round_program(lanes, images, labels, val_images, val_labels, val_mask):
        def one(lane):
            return _train_one(graphdef, st, batch_spec, report, gated, lane)(
                images, labels, val_images, val_labels, val_mask
            )

        if jax.tree.leaves(lanes)[0].shape[0] == 1:
            # A population of one runs unbatched: XLA:CPU's batched matmuls cost ~1.5x here.
            single = one(jax.tree.map(lambda x: x[0], lanes))
            return jax.tree.map(lambda x: x[None], single)
        return jax.vmap(one, spmd_axis_name=sharding.ROUNDS_AXIS)(lanes)

    return jax.jit(
        round_program,
        in_shardings=(pop, rep, rep, rep, rep, rep),
        out_shardings=rep,
    )


def init_program(bucket_arch, input_shape, num_classes: int, mesh) -> Callable:
    """The vmapped init of a bucket: ``(raw_keys, log_rates, sizes) -> (params, rest, mask)``.

    Real units start from the unpadded init distribution and the padding at zero (``padding``).
    It runs once per round, so it is compiled for compile speed (``sharding.run_once_options``:
    a truncated-normal init compiles 3-5x faster).
    """
    pop = sharding.population_sharded(mesh)
    params_shape, rest_shape = jax.eval_shape(
        lambda: steps.init_instance(bucket_arch, input_shape, num_classes, jax.random.key(0), -1.0)
    )

    def init_lane(raw_key, log_rate, sizes):
        if not bucket_arch.builtin:  # a registered backbone: its own init, never padded
            params, rest = steps.init_instance(
                bucket_arch, input_shape, num_classes, jax.random.wrap_key_data(raw_key), log_rate
            )
            return params, rest, jax.tree.map(jnp.ones_like, params)
        mask = padding.masks(params_shape, bucket_arch, sizes)
        params = padding.init(params_shape, mask, jax.random.wrap_key_data(raw_key))
        rest = jax.tree.map(lambda x: jnp.full(x.shape, log_rate, x.dtype), rest_shape)
        return params, rest, mask

    return jax.jit(
        jax.vmap(init_lane),
        in_shardings=(pop, pop, pop),
        out_shardings=pop,
        compiler_options=sharding.run_once_options(mesh),
    )


def padded_validation(split: data_lib.Split, eval_batch: int) -> tuple[np.ndarray, ...]:
    """Validation images, labels and a mask, zero-padded to whole evaluation batches."""
    n = len(split.labels)
    total = -(-n // eval_batch) * eval_batch
    images = np.zeros((total, *split.images.shape[1:]), split.images.dtype)
    labels = np.zeros((total,), split.labels.dtype)
    images[:n], labels[:n] = split.images, split.labels
    return images, labels, np.arange(total) < n
