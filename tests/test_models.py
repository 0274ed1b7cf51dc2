"""Tests for jaxes.models: ExpDropout, feature blocks, backbones, Arch and the dropout-rate draw."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxes import models

DIGITS_SHAPE = (8, 8, 1)
NUM_CLASSES = 10
UNITS = 100_000


def _abstract_model(arch, input_shape=DIGITS_SHAPE):
    """The model's structure without computing it (no XLA compile: these tests stay fast)."""
    return nnx.eval_shape(
        lambda: models.build(arch, input_shape, NUM_CLASSES, jax.random.key(0), -1.0)
    )


def _params_count(model) -> int:
    return sum(leaf.size for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)))


# ExpDropout ---------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.02, 0.25, 0.5, 0.9])
def test_exp_dropout_zeroes_exp_log_rate_and_rescales_survivors(rate):
    dropout = models.ExpDropout(math.log(rate))
    out = np.asarray(dropout(jnp.ones(UNITS), jax.random.key(0)))
    zeroed = out == 0.0
    assert abs(zeroed.mean() - rate) < 0.01
    # Survivors carry 1 / (1 - rate), so the expected activation is unchanged.
    np.testing.assert_allclose(out[~zeroed], 1.0 / (1.0 - rate), rtol=1e-6)
    assert abs(out.mean() - 1.0) < 0.05


def test_exp_dropout_mask_is_a_function_of_the_key():
    dropout = models.ExpDropout(math.log(0.5))
    x = jnp.ones(1000)
    first = dropout(x, jax.random.key(1))
    np.testing.assert_array_equal(first, dropout(x, jax.random.key(1)))
    assert not np.array_equal(first, dropout(x, jax.random.key(2)))
    # Under jit, with the key traced, the mask is the same as eagerly.
    np.testing.assert_array_equal(first, jax.jit(lambda k: dropout(x, k))(jax.random.key(1)))


@pytest.mark.parametrize("log_rate", [0.0, 0.5, math.nan, math.inf, -math.inf])
def test_exp_dropout_rejects_log_rates_that_are_not_finite_and_negative(log_rate):
    with pytest.raises(ValueError, match="log_rate"):
        models.ExpDropout(log_rate)


def test_exp_dropout_eval_mode_is_identity():
    x = jax.random.normal(jax.random.key(0), (1000,))
    np.testing.assert_array_equal(models.ExpDropout(math.log(0.9))(x), x)


# FeatureBlock and Model ---------------------------------------------------------------------


def test_feature_block_applies_gelu_to_its_layer():
    x = jax.random.normal(jax.random.key(1), (16, 5))

    @jax.jit
    def outputs(x):
        block = models.FeatureBlock("dense", 5, 7, math.log(0.1), rngs=nnx.Rngs(0))
        return block.layer(x), block(x)  # eval mode: no dropout

    pre, out = outputs(x)
    np.testing.assert_allclose(out, jax.nn.gelu(pre), rtol=1e-6, atol=1e-7)
    # The comparison can tell GELU from ReLU: some pre-activations are negative.
    assert not np.allclose(out, jax.nn.relu(pre), atol=1e-3)


def test_conv_blocks_are_3x3_convolutions():
    model = _abstract_model(models.Arch("cnn", depth=2, width=6, embed_dim=5))
    kernels = [block.layer.kernel.shape for block in model.blocks]
    assert kernels == [(3, 3, 1, 6), (3, 3, 6, 6)]


@pytest.mark.parametrize("shape", [(2, 8, 8, 1), (3, 5, 7, 4)])
def test_conv_same_3x3_equals_a_same_padded_xla_convolution(shape):
    layer = models.ConvSame(shape[-1], 6, rngs=nnx.Rngs(3))
    layer.bias[...] = jax.random.normal(jax.random.key(4), (6,))
    x = jax.random.normal(jax.random.key(5), shape)
    reference = jax.lax.conv_general_dilated(
        x, layer.kernel[...], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    np.testing.assert_allclose(layer(x), reference + layer.bias[...], rtol=1e-5, atol=1e-5)


def test_feature_block_rejects_unknown_kind():
    with pytest.raises(ValueError, match="kind"):
        models.FeatureBlock("lstm", 4, 4, -1.0, rngs=nnx.Rngs(0))


@pytest.mark.parametrize(
    "arch",
    [
        models.Arch("mlp", depth=1, width=32, embed_dim=8),
        models.Arch("mlp", depth=3, width=16, embed_dim=12),
        models.Arch("cnn", depth=1, width=4, embed_dim=8),
        models.Arch("cnn", depth=2, width=6, embed_dim=5),
    ],
    ids=lambda arch: arch.short(),
)
def test_embed_and_logits_shapes(arch):
    def forward(images, key):
        model = models.build(arch, DIGITS_SHAPE, NUM_CLASSES, jax.random.key(0), math.log(0.2))
        return model.embed(images), model.logits(images), model.logits(images, key)

    images = jax.ShapeDtypeStruct((3, *DIGITS_SHAPE), jnp.float32)
    embedding, logits, train_logits = jax.eval_shape(forward, images, jax.random.key(1))
    assert embedding.shape == (3, arch.embed_dim)
    assert logits.shape == train_logits.shape == (3, NUM_CLASSES)


def _dense(fan_in, fan_out):
    return fan_in * fan_out + fan_out


def _conv3x3(channels_in, channels_out):
    return 9 * channels_in * channels_out + channels_out


@pytest.mark.parametrize(("depth", "width", "embed_dim"), [(1, 32, 8), (3, 16, 12)])
def test_mlp_parameter_count(depth, width, embed_dim):
    arch = models.Arch("mlp", depth=depth, width=width, embed_dim=embed_dim)
    model = _abstract_model(arch)
    blocks = _dense(64, width) + (depth - 1) * _dense(width, width)
    expected = blocks + _dense(width, embed_dim) + _dense(embed_dim, NUM_CLASSES)
    assert _params_count(model) == expected


@pytest.mark.parametrize(
    ("input_shape", "depth", "side"),
    # The CNN halves the resolution after a block while it is at least 8: 8x8 -> 4x4, and
    # 16x16 -> 8x8 -> 4x4, after which it stays.
    [((8, 8, 1), 1, 4), ((8, 8, 1), 3, 4), ((16, 16, 3), 3, 4), ((6, 6, 2), 2, 6)],
)
def test_cnn_parameter_count(input_shape, depth, side):
    width, embed_dim = 5, 7
    arch = models.Arch("cnn", depth=depth, width=width, embed_dim=embed_dim)
    model = _abstract_model(arch, input_shape)
    blocks = _conv3x3(input_shape[-1], width) + (depth - 1) * _conv3x3(width, width)
    embedding = _dense(side * side * width, embed_dim)
    assert _params_count(model) == blocks + embedding + _dense(embed_dim, NUM_CLASSES)


SMALL = models.Arch(depth=2, width=32, embed_dim=8)


def test_log_rate_is_state_but_not_a_trained_parameter():
    model = _abstract_model(SMALL)
    variables = [variable for _, variable in nnx.to_flat_state(nnx.state(model))]
    assert {type(variable) for variable in variables} == {nnx.Param, models.LogRate}
    assert sum(isinstance(v, models.LogRate) for v in variables) == SMALL.depth
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    assert not any(isinstance(variable, models.LogRate) for _, variable in params)

    log_rate = math.log(0.3)
    # jit, so the unused parameter initialization is compiled away rather than run op by op.
    rates = jax.jit(
        lambda: nnx.state(
            models.build(SMALL, DIGITS_SHAPE, NUM_CLASSES, jax.random.key(0), log_rate),
            models.LogRate,
        )
    )()
    np.testing.assert_allclose(jax.tree.leaves(rates), [log_rate] * SMALL.depth, rtol=1e-6)


def test_model_dropout_only_with_a_key_and_init_from_key():
    images = jax.random.uniform(jax.random.key(1), (4, *DIGITS_SHAPE))

    @jax.jit
    def outputs(init_key, dropout_key):
        model = models.build(SMALL, DIGITS_SHAPE, NUM_CLASSES, init_key, math.log(0.5))
        return model.embed(images), model.embed(images, dropout_key), model.logits(images)

    evaluated, dropped, logits = outputs(jax.random.key(0), jax.random.key(2))
    evaluated_again, dropped_again, same_logits = outputs(jax.random.key(0), jax.random.key(2))
    np.testing.assert_array_equal(evaluated, evaluated_again)
    np.testing.assert_array_equal(dropped, dropped_again)
    np.testing.assert_array_equal(logits, same_logits)
    assert not np.allclose(evaluated, dropped)
    _, dropped_other, other_logits = outputs(jax.random.key(1), jax.random.key(3))
    assert not np.allclose(dropped, dropped_other)
    assert not np.allclose(logits, other_logits)


def test_build_rejects_bad_log_rate():
    with pytest.raises(ValueError, match="log_rate"):
        nnx.eval_shape(
            lambda: models.build(models.Arch(), DIGITS_SHAPE, NUM_CLASSES, jax.random.key(0), 0.0)
        )


# Arch -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("backbone", "rnn"),
        ("depth", 0),
        ("depth", True),
        ("width", -3),
        ("width", 2.0),
        ("embed_dim", "64"),
    ],
)
def test_arch_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"Arch\.{field}\b"):
        models.Arch(**{field: value})


def test_arch_from_dict_names_unknown_fields():
    with pytest.raises(ValueError, match="widht"):
        models.Arch.from_dict({"backbone": "mlp", "widht": 3})


@pytest.mark.parametrize(
    "arch",
    [models.Arch(), models.Arch("cnn", depth=3, width=48, embed_dim=16)],
    ids=lambda arch: arch.short(),
)
def test_arch_json_round_trip_and_hash(arch):
    back = models.Arch.from_dict(json.loads(arch.to_json()))
    assert back == arch
    assert hash(back) == hash(arch)
    assert {arch: "x"}[back] == "x"


def test_distinct_arches_are_distinct_keys():
    arches = {models.Arch(), models.Arch(depth=3), models.Arch("cnn"), models.Arch(embed_dim=8)}
    assert len(arches) == 4


# draw_log_rate --------------------------------------------------------------------------------


def test_draw_log_rate_is_log_uniform_in_range():
    low, high = 0.02, 0.5
    draws = np.array([models.draw_log_rate(jax.random.key(i), (low, high)) for i in range(200)])
    assert np.all(draws >= math.log(low)) and np.all(draws <= math.log(high))
    assert np.all(draws < 0)
    span = math.log(high) - math.log(low)
    # It covers the range, and half the draws fall below the geometric midpoint.
    assert draws.min() < math.log(low) + 0.05 * span
    assert draws.max() > math.log(high) - 0.05 * span
    assert abs(np.mean(draws < math.log(math.sqrt(low * high))) - 0.5) < 0.15
    assert models.draw_log_rate(jax.random.key(3), (low, high)) == draws[3]


def test_draw_log_rate_degenerate_range_is_that_rate():
    assert models.draw_log_rate(jax.random.key(0), (0.1, 0.1)) == pytest.approx(math.log(0.1))


@pytest.mark.parametrize(
    "rate_range", [(0.0, 0.5), (-0.1, 0.5), (0.5, 0.1), (0.1, 1.0), (0.1, 1.5)]
)
def test_draw_log_rate_rejects_bad_ranges(rate_range):
    with pytest.raises(ValueError, match="rate range"):
        models.draw_log_rate(jax.random.key(0), rate_range)
