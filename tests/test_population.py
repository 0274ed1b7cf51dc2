"""Tests for the population engine: the jnp convergence rule, padding, generations, sharding."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxes import data as data_lib
from jaxes import models, padding, population, sharding, steps, stopping, train
from tests.test_train import _train_config


def _device_rule(losses, patience, min_delta, max_epochs):
    """Feeds ``losses`` to the jnp rule, as the device program does; returns its decisions."""
    rule = jax.jit(population.patience_rule, static_argnames=("patience", "max_epochs"))
    best, streak = jnp.float32(jnp.inf), jnp.int32(0)
    out = []
    for epoch, loss in enumerate(losses):
        best, streak, improved, stopped = rule(
            best, streak, jnp.int32(epoch), jnp.float32(loss),
            patience=patience, min_delta=min_delta, max_epochs=max_epochs,
        )  # fmt: skip
        out.append((bool(improved), int(streak), bool(stopped)))
        if stopped:
            break
    return out


def _host_rule(losses, patience, min_delta, max_epochs):
    state = stopping.init(
        rounds=max_epochs, patience=patience, mode="min", min_delta=min_delta, extend=False
    )
    out = []
    for loss in losses:
        state = stopping.update(state, float(np.float32(loss)))
        out.append((state.improved, state.streak, state.stopped))
        if state.stopped:
            break
    return out


# Losses on a coarse float32 grid make ties and exact deltas common; NaN and inf test the
# non-finite path (never the best, counts as below it). No subnormals: XLA reads a float32
# subnormal as 0 and flushes every result it computes to 0, so a loss made on the device is
# never one, and fed one from the host the device rule sees a 0 (hypothesis found 3e-42 tie 0).
_LOSS = st.one_of(
    st.integers(0, 64).map(lambda k: k / 16),
    st.sampled_from([math.nan, math.inf, -math.inf]),
    st.floats(0, 10, width=32, allow_subnormal=False),
)


@settings(max_examples=200, deadline=None)
@given(
    losses=st.lists(_LOSS, min_size=1, max_size=30),
    patience=st.integers(1, 8),
    max_epochs=st.integers(1, 30),
    min_delta=st.sampled_from([0.0, 0.0625, 0.25]),
)
def test_jnp_rule_equals_stopping_on_every_sequence(losses, patience, max_epochs, min_delta):
    # A delta on the 1/16 grid is exact in float32 and float64, so both round identically.
    if min_delta:
        losses = [x if not math.isfinite(x) else round(x * 16) / 16 for x in losses]
    assert _device_rule(losses, patience, min_delta, max_epochs) == _host_rule(
        losses, patience, min_delta, max_epochs
    )


def test_jnp_rule_ties_reset_and_stops_at_patience():
    # Hand-worked: 1.0 best; 1.0 tie resets (claim 4); 2, 3 below; patience 2 stops at epoch 3.
    assert _device_rule([1.0, 1.0, 2.0, 3.0, 0.5], 2, 0.0, 10) == [
        (True, 0, False),
        (False, 0, False),
        (False, 1, False),
        (False, 2, True),
    ]


def _abstract(arch, input_shape):
    """An ``arch`` model with abstract variables: its structure, without compiling its init."""
    return nnx.eval_shape(lambda: models.build(arch, input_shape, 10, jax.random.key(0), -1.0))


def _padded_and_own(arch, bucket, input_shape, key):
    """A trained-like padded instance (random real part), and its unpadded cut."""
    params_shape, _ = jax.eval_shape(
        lambda: steps.init_instance(bucket, input_shape, 10, jax.random.key(0), -1.0)
    )
    sizes = padding.RealSizes.one(arch, bucket.depth)
    mask = padding.masks(params_shape, bucket, sizes)
    params = padding.init(params_shape, mask, key)
    # Make biases non-zero on real units so the test sees them too.
    params = jax.tree.map(lambda p, m: p + 0.1 * m, params, mask)
    own = padding.unpad(nnx.to_pure_dict(params), bucket, arch)
    return params, own, mask


@pytest.mark.parametrize(
    "arch,bucket",
    [
        (models.Arch("mlp", 2, 24, 8), models.Arch("mlp", 2, 64, 32)),
        (models.Arch("mlp", 1, 64, 16), models.Arch("mlp", 1, 64, 32)),
        (models.Arch("cnn", 2, 8, 8), models.Arch("cnn", 2, 16, 16)),
        # Block fields (issue #11): identity skips, per-block widths with projected skips, and
        # a CNN with 5x5 kernels whose blocks pad.
        (
            models.Arch("mlp", 2, 24, 8, residual=True),
            models.Arch("mlp", 2, 64, 32, residual=True),
        ),
        (
            models.Arch("mlp", 3, 12, 8, residual=True, width_growth=2.0),
            models.Arch("mlp", 3, 32, 16, residual=True, width_growth=2.0),
        ),
        (
            models.Arch("cnn", 2, 4, 8, kernel_size=5, residual=True, width_growth=2.0),
            models.Arch("cnn", 2, 8, 16, kernel_size=5, residual=True, width_growth=2.0),
        ),
        # Depth pads too: MLPs and CNNs of fewer blocks, with and without identity skips, in
        # deeper buckets.
        (models.Arch("mlp", 1, 24, 8), models.Arch("mlp", 3, 64, 32)),
        (
            models.Arch("mlp", 2, 24, 8, residual=True),
            models.Arch("mlp", 4, 64, 32, residual=True),
        ),
        (models.Arch("cnn", 1, 8, 8), models.Arch("cnn", 3, 8, 16)),
        (
            models.Arch("cnn", 2, 8, 8, residual=True),
            models.Arch("cnn", 3, 8, 16, residual=True),
        ),
    ],
    ids=lambda arch: arch.short(),
)
def test_padded_instance_computes_its_own_architecture(arch, bucket):
    input_shape = (8, 8, 1)
    params, own, mask = _padded_and_own(arch, bucket, input_shape, jax.random.key(3))
    images = jax.random.uniform(jax.random.key(4), (5, *input_shape))

    def outputs_of(a, pure, mask=None):
        """(logits, embedding) of ``a`` with every variable taken from ``pure``, compiled (an
        eager forward pass compiles each op on its own, which costs far more here)."""
        graphdef, state = nnx.split(_abstract(a, input_shape))
        nnx.replace_by_pure_dict(state, pure)
        model = nnx.merge(graphdef, state)

        def run(m, x, mask):
            gates = None if mask is None else padding.gates(mask)
            return steps.logits_of(m, x, gates=gates), m.embed(x, gates=gates)

        if mask is not None:  # the skipped blocks are branches, not computed and selected
            assert "cond[" in str(jax.make_jaxpr(lambda x: run(model, x, mask))(images))
        return nnx.jit(run)(model, images, mask)

    def rates(depth):
        return {"blocks": {i: {"dropout": {"log_rate": -1.0}} for i in range(depth)}}

    padded = train._merge(nnx.to_pure_dict(params), rates(bucket.depth))
    padded_logits, emb = outputs_of(bucket, padded, mask if bucket.depth > arch.depth else None)
    small_logits, small_emb = outputs_of(arch, train._merge(own, rates(arch.depth)))
    # Equal up to the order of float32 additions (residual stacks reach logits in the hundreds).
    tol = {"rtol": 1e-5, "atol": 1e-5}
    np.testing.assert_allclose(padded_logits, small_logits, **tol)
    np.testing.assert_allclose(emb[:, : arch.embed_dim], small_emb, **tol)
    assert np.all(np.asarray(emb[:, arch.embed_dim :]) == 0)
    # The cut has exactly the unpadded shapes.
    reference = nnx.to_pure_dict(nnx.state(_abstract(arch, input_shape), nnx.Param))
    assert jax.tree.map(np.shape, own) == jax.tree.map(np.shape, reference)


@pytest.mark.parametrize(
    "arch,bucket",
    [
        (models.Arch("mlp", 2, 24, 8), models.Arch("mlp", 2, 64, 32)),
        (
            models.Arch("mlp", 3, 12, 8, residual=True, width_growth=2.0),
            models.Arch("mlp", 3, 32, 16, residual=True, width_growth=2.0),
        ),
        (models.Arch("mlp", 1, 24, 8), models.Arch("mlp", 3, 64, 32)),
        (models.Arch("cnn", 2, 8, 8), models.Arch("cnn", 3, 8, 16)),
    ],
    ids=lambda arch: arch.short(),
)
def test_padding_gets_zero_gradient_and_stays_zero(arch, bucket):
    params, _, mask = _padded_and_own(arch, bucket, (8, 8, 1), jax.random.key(5))
    graphdef, _, rest = nnx.split(_abstract(bucket, (8, 8, 1)), nnx.Param, models.LogRate)
    rest = jax.tree.map(lambda x: jnp.full(x.shape, -1.5, x.dtype), rest)
    images = jax.random.uniform(jax.random.key(6), (16, 8, 8, 1))
    labels = jnp.arange(16) % 10

    def loss(p):
        model = nnx.merge(graphdef, p, rest)
        gates = padding.gates(mask) if bucket.depth > arch.depth else None
        logits = steps.logits_of(model, images, jax.random.key(7), gates)
        return jnp.mean(logits**2) + jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(16), labels])

    grads = jax.jit(jax.grad(loss))(params)
    for g, m in zip(jax.tree.leaves(grads), jax.tree.leaves(mask), strict=True):
        real = np.asarray(m) == 1
        assert np.all(np.asarray(g)[~real] == 0)
        assert not real.any() or np.any(np.asarray(g)[real] != 0)  # a skipped block has none


def test_depth_pads_where_every_block_has_one_width_and_no_later_block_pools():
    space = {"depth": (1, 2, 3), "width": (32, 64), "embed_dim": (8, 16)}
    both, digits_shape = ("mlp", "cnn"), (8, 8, 1)

    def bucket(arch, depth_backbones=both, shape=digits_shape):
        return padding.bucket(arch, space, ("mlp",), depth_backbones, shape)

    assert bucket(models.Arch("mlp", 1, 32, 8)) == models.Arch("mlp", 3, 64, 16)
    residual = models.Arch("mlp", 2, 32, 8, residual=True)
    assert bucket(residual) == models.Arch("mlp", 3, 64, 16, residual=True)
    # A CNN on digits pools after its first block only: its depth pads, its width does not.
    assert bucket(models.Arch("cnn", 1, 32, 8)) == models.Arch("cnn", 3, 32, 16)
    # Not: a CNN that pools again (32x32), or by its distance to the last block; grown or
    # normalized blocks; a backbone not asked for; a space of one depth.
    assert bucket(models.Arch("cnn", 1, 32, 8), shape=(32, 32, 3)).depth == 1
    assert bucket(models.Arch("cnn", 2, 32, 8, downsample="alternate")).depth == 2
    grown = models.Arch("mlp", 2, 32, 8, width_growth=2.0)
    assert bucket(grown) == models.Arch("mlp", 2, 64, 16, width_growth=2.0)
    normed = models.Arch("mlp", 2, 32, 8, norm="layer")
    assert bucket(normed) == models.Arch("mlp", 2, 32, 16, norm="layer")
    assert bucket(models.Arch("cnn", 1, 32, 8), depth_backbones=("mlp",)).depth == 1
    assert padding.bucket(models.Arch("mlp", 1, 32, 8), space).depth == 1  # default: none
    one_depth = {**space, "depth": (2,)}
    assert not padding.skips_blocks(models.Arch("mlp", 2, 32, 8), one_depth, both, digits_shape)
    # The gates read the mask: blocks beyond an instance's depth are out.
    deep = models.Arch("mlp", 3, 64, 16)
    params_shape, _ = jax.eval_shape(
        lambda: steps.init_instance(deep, digits_shape, 10, jax.random.key(0), -1.0)
    )
    for depth in (1, 2, 3):
        sizes = padding.RealSizes.one(models.Arch("mlp", depth, 32, 8), deep.depth)
        gates = padding.gates(padding.masks(params_shape, deep, sizes))
        assert [bool(g) for g in gates] == [i < depth for i in range(3)]
    with pytest.raises(ValueError, match="depth 1 cannot hold mlp-2x32-e8"):
        padding.RealSizes.one(models.Arch("mlp", 2, 32, 8), 1)


def test_padded_init_matches_the_unpadded_init_distribution():
    # Real units of a padded hidden kernel (fan-in 24 of 256) against the model's own init.
    arch, bucket = models.Arch("mlp", 2, 24, 8), models.Arch("mlp", 2, 256, 64)
    stds, own_stds = [], []
    for seed in range(20):
        _, own, _ = _padded_and_own(arch, bucket, (8, 8, 1), jax.random.key(seed))
        stds.append(np.std(own["blocks"][1]["layer"]["kernel"]))
        reference = models.build(arch, (8, 8, 1), 10, jax.random.key(100 + seed), -1.0)
        own_stds.append(np.std(np.asarray(reference.blocks[1].layer.kernel[...])))
    # lecun_normal: std 1/sqrt(fan_in) = 0.204 for fan-in 24; the two agree to sampling error.
    assert np.mean(stds) == pytest.approx(1 / math.sqrt(24), rel=0.05)
    assert np.mean(stds) == pytest.approx(np.mean(own_stds), rel=0.05)
    # In a bucket of three blocks, the embedding of a one-block instance reads its one real
    # block: its kernel is drawn on that block's width (24), not on the bucket's.
    embedding_stds = []
    for seed in range(20):
        arch, deep = models.Arch("mlp", 1, 24, 8), models.Arch("mlp", 3, 256, 64)
        _, own, _ = _padded_and_own(arch, deep, (8, 8, 1), jax.random.key(200 + seed))
        assert own["embedding"]["kernel"].shape == (24, 8)
        embedding_stds.append(np.std(own["embedding"]["kernel"]))
    assert np.mean(embedding_stds) == pytest.approx(1 / math.sqrt(24), rel=0.05)


def test_group_sizes_are_powers_of_two_dividing_the_rounds_axis():
    assert [train.group_size(n, 1) for n in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, 16]
    assert [train.group_size(n, 4) for n in (1, 2, 3, 5)] == [4, 4, 4, 8]
    assert train.group_size(3, 3) == 6


def _mlp_generation(archs, seed: int):
    """A short training config, an MLP space of two widths and embeddings, and one job per arch."""
    config = _train_config()
    config.max_epochs = 8
    config.patience = 2
    space = {"backbone": ("mlp",), "width": (16, 32), "embed_dim": (8, 16)}
    return (
        config,
        space,
        [train.Job(a, jax.random.key(seed + i), 1e-3, 1e-4) for i, a in enumerate(archs)],
    )


def test_a_population_equals_its_members_trained_alone(digits):
    """Each instance of a vmapped group converges on its own: as if trained alone, where a
    vmapped cond computes a skipped block and selects its input, and a lone one skips it."""
    archs = [
        models.Arch("mlp", 1, 16, 8),
        models.Arch("mlp", 2, 32, 16),
        models.Arch("mlp", 1, 32, 8),
    ]
    config, space, jobs = _mlp_generation(archs, 10)
    space["depth"] = (1, 2)  # one bucket of depth 2
    jobs = [
        dataclasses.replace(j, learning_rate=lr)
        for j, lr in zip(jobs, (1e-3, 3e-3, 1e-2), strict=True)
    ]
    engine = train.Engine(digits, config, space=space, host_threads=1)  # vmapped, one thread
    together = engine.train(jobs)
    alone = [engine.train([job])[0] for job in jobs]
    assert engine.compiles == 2  # group sizes 4 (three jobs, padded) and 1
    for a, b in zip(together, alone, strict=True):
        assert a.epochs == b.epochs and a.best_epoch == b.best_epoch
        assert [h["val_accuracy"] for h in a.history] == [h["val_accuracy"] for h in b.history]
        np.testing.assert_allclose(
            [h["val_loss"] for h in a.history], [h["val_loss"] for h in b.history], rtol=1e-5
        )
    # Different hyper-parameters really did give different runs.
    assert len({r.epochs for r in together} | {r.metrics["val_loss"] for r in together}) > 1


def test_rounds_on_host_threads_equal_the_rounds_trained_one_at_a_time(digits):
    """On a CPU run of one process and one device every round of a generation is its own program
    and the rounds run side by side on host threads; each program is deterministic, so every
    result is bitwise what training that round alone gives."""
    archs = [
        models.Arch("mlp", 1, 16, 8),
        models.Arch("mlp", 2, 16, 8),
        models.Arch("mlp", 1, 32, 8),
    ]
    config, space, jobs = _mlp_generation(archs, 20)
    cores = train.usable_cores()
    assert train.Engine(digits, config)._threads() == cores
    listened = train.Engine(digits, config, on_epoch=lambda *args: None)
    assert listened._threads() == 1  # a listener would hear two programs at once
    threaded = train.Engine(digits, config, space=space, host_threads=2)
    together = threaded.train(jobs)
    assert threaded.compiles == 2  # two buckets (depths 1 and 2), each a program of one round
    serial = train.Engine(digits, config, space=space, host_threads=1)
    alone = [serial.train([job])[0] for job in jobs]
    for a, b in zip(together, alone, strict=True):
        assert (a.epochs, a.best_epoch, a.history) == (b.epochs, b.best_epoch, b.history)
        assert a.metrics == b.metrics
        for x, y in zip(jax.tree.leaves(a.state), jax.tree.leaves(b.state), strict=True):
            assert np.asarray(x).tobytes() == np.asarray(y).tobytes()
    assert len({r.metrics["val_loss"] for r in together}) == 3  # three different instances
    with pytest.raises(ValueError, match="host_threads"):
        train.Engine(digits, config, host_threads=0)


def test_kept_instance_matches_padded_training_on_validation(digits):
    """The saved (unpadded) instance scores exactly what the padded one scored in training."""
    from jaxes import infer

    config = _train_config()
    config.max_epochs = 5
    space = {"width": (16, 64), "embed_dim": (8, 32)}
    engine = train.Engine(digits, config, space=space)
    result = engine.train([train.Job(models.Arch("mlp", 2, 16, 8), jax.random.key(1), 1e-3, 0)])[0]
    assert result.bucket == models.Arch("mlp", 2, 64, 32)
    mesh = sharding.make_mesh()
    evaluator = infer.Evaluator(result.graphdef, digits.spec, mesh, 512)
    val = evaluator.evaluate(result.state, digits.validation)
    assert val["accuracy"] == result.metrics["val_accuracy"]
    assert val["loss"] == pytest.approx(result.metrics["val_loss"], abs=1e-5)
    assert isinstance(digits, data_lib.Data)


@pytest.mark.parametrize(
    "arch,bucket",
    [
        (models.Arch("mlp", 1, 16, 8), models.Arch("mlp", 3, 64, 32)),
        (models.Arch("cnn", 1, 16, 8), models.Arch("cnn", 3, 16, 32)),
    ],
    ids=lambda arch: arch.short(),
)
def test_kept_instance_of_a_deeper_bucket_matches_its_training(digits, arch, bucket):
    """One block trained in a bucket of three: the saved instance has one block and scores
    what it scored in training."""
    from jaxes import infer

    config = _train_config()
    config.max_epochs = 4
    space = {"depth": (1, 3), "width": (16, 64), "embed_dim": (8, 32)}
    engine = train.Engine(digits, config, space=space, depth_backbones=("mlp", "cnn"))
    result = engine.train([train.Job(arch, jax.random.key(2), 1e-3, 0)])[0]
    assert result.bucket == bucket
    assert sorted(nnx.to_pure_dict(result.state)["blocks"]) == [0]
    evaluator = infer.Evaluator(result.graphdef, digits.spec, sharding.make_mesh(), 512)
    val = evaluator.evaluate(result.state, digits.validation)
    assert val["accuracy"] == result.metrics["val_accuracy"]
    assert val["loss"] == pytest.approx(result.metrics["val_loss"], abs=1e-5)
