"""Tests for the block fields of models.Arch (issue #11): residual skips, normalization, CNN
kernel size, the downsampling schedule and per-block widths; and how padding treats them."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxes import models, padding, progress, steps

NUM_CLASSES = 10


def _abstract(arch, input_shape=(8, 8, 1)):
    return nnx.eval_shape(
        lambda: models.build(arch, input_shape, NUM_CLASSES, jax.random.key(0), -1.0)
    )


def _shapes(arch, input_shape=(8, 8, 1)) -> dict:
    """Parameter path -> shape, e.g. ``"blocks/0/layer/kernel" -> (3, 3, 1, 8)``."""
    flat = nnx.to_flat_state(nnx.state(_abstract(arch, input_shape), nnx.Param))
    return {"/".join(map(str, path)): tuple(v.shape) for path, v in flat}


# Arch: defaults, canonical form, validation ---------------------------------------------------


def test_old_arch_dicts_load_with_the_original_blocks():
    # A dict as metadata recorded it before the block fields existed.
    old = {"backbone": "cnn", "depth": 2, "width": 64, "embed_dim": 32}
    arch = models.Arch.from_dict(old)
    assert (arch.kernel_size, arch.downsample, arch.norm, arch.residual) == (
        3,
        "every",
        "none",
        False,
    )
    assert arch.widths == (64, 64)
    assert arch.short() == "cnn-2x64-e32"
    # The same parameters, by name and shape, as the original CNN: old checkpoints restore.
    assert _shapes(arch) == {
        "blocks/0/layer/kernel": (3, 3, 1, 64),
        "blocks/0/layer/bias": (64,),
        "blocks/1/layer/kernel": (3, 3, 64, 64),
        "blocks/1/layer/bias": (64,),
        "embedding/kernel": (4 * 4 * 64, 32),  # 8x8 -> 4x4 after block 0, then stays
        "embedding/bias": (32,),
        "head/kernel": (32, NUM_CLASSES),
        "head/bias": (NUM_CLASSES,),
    }


def test_fields_that_do_not_apply_are_canonical():
    # An MLP has no kernels or pooling; one block has no skip and no growth.
    mlp = models.Arch("mlp", 2, 32, 8, kernel_size=5, downsample="none")
    assert mlp == models.Arch("mlp", 2, 32, 8) and hash(mlp) == hash(models.Arch("mlp", 2, 32, 8))
    assert mlp.to_dict() == {"backbone": "mlp", "depth": 2, "width": 32, "embed_dim": 8}
    assert models.Arch(depth=1, residual=True, width_growth=2) == models.Arch(depth=1)
    # Where they apply they stay, and an int growth is the same architecture as its float.
    cnn = models.Arch("cnn", 2, 8, 8, kernel_size=5, downsample="none")
    assert (cnn.kernel_size, cnn.downsample) == (5, "none")
    assert models.Arch(width_growth=2) == models.Arch(width_growth=2.0)
    assert models.Arch(width_growth=2).to_json() == models.Arch(width_growth=2.0).to_json()
    back = models.Arch.from_dict(models.Arch("cnn", 3, 8, 8, norm="group", residual=True,
                                             width_growth=0.5).to_dict())  # fmt: skip
    assert back.short() == "cnn-3x8-e8-groupnorm-res-grow0.5"


def test_labels_leave_out_block_fields_at_their_defaults():
    # progress is stdlib only, so it repeats the defaults: they must be models.Arch's.
    defaults = {f.name: f.default for f in dataclasses.fields(models.Arch)}
    assert {k: defaults[k] for k in models.BLOCK_FIELDS} == progress.ARCH_LABEL_DEFAULTS
    arch = models.Arch("cnn", 2, 64, 32, norm="layer").to_dict()
    assert progress.arch_short(arch) == "cnn d2 w64 e32 norm=layer"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("kernel_size", 4),
        ("kernel_size", 9),
        ("kernel_size", 3.0),
        ("downsample", "stride"),
        ("norm", "batch"),
        ("residual", 1),
        ("width_growth", 0.0),
        ("width_growth", math.inf),
        ("width_growth", "2"),
        ("width_growth", True),
    ],
)
def test_block_field_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=rf"Arch\.{field}\b"):
        models.Arch("cnn", **{field: value})


def test_per_block_widths_grow_geometrically_and_round_to_nearest():
    assert models.Arch(depth=3, width=64, width_growth=0.5).widths == (64, 32, 16)
    assert models.Arch(depth=3, width=10, width_growth=1.5).widths == (10, 15, 23)  # 22.5 up
    assert models.Arch(depth=4, width=3, width_growth=0.25).widths == (3, 1, 1, 1)  # at least 1


# Parameter shapes of each field ---------------------------------------------------------------


def test_kernel_size_sets_the_conv_kernels():
    shapes = _shapes(models.Arch("cnn", 2, 6, 4, kernel_size=5))
    assert shapes["blocks/0/layer/kernel"] == (5, 5, 1, 6)
    assert shapes["blocks/1/layer/kernel"] == (5, 5, 6, 6)


@pytest.mark.parametrize(
    ("input_shape", "depth", "downsample", "side"),
    [
        # 28x28: halved while the side is >= 8, so 28 -> 14 -> 7, then it stays.
        ((28, 28, 1), 1, "every", 14),
        ((28, 28, 1), 3, "every", 7),
        ((28, 28, 1), 2, "alternate", 14),  # pools after the last block only
        ((28, 28, 1), 3, "alternate", 7),  # after blocks 0 and 2
        # 32x32: 32 -> 16 -> 8 -> 4.
        ((32, 32, 3), 3, "every", 4),
        ((32, 32, 3), 4, "every", 4),
        ((32, 32, 3), 4, "alternate", 8),  # after blocks 1 and 3
        ((32, 32, 3), 2, "none", 32),
        ((8, 8, 1), 2, "alternate", 4),
    ],
)
def test_downsampling_schedule_sets_the_final_resolution(input_shape, depth, downsample, side):
    arch = models.Arch("cnn", depth, 4, 8, downsample=downsample)
    assert _shapes(arch, input_shape)["embedding/kernel"] == (side * side * 4, 8)


def test_norms_add_a_scale_and_bias_per_unit():
    for norm in ("layer", "group"):
        shapes = _shapes(models.Arch("mlp", 2, 24, 8, norm=norm))
        assert shapes["blocks/0/norm/scale"] == shapes["blocks/1/norm/bias"] == (24,)
    block = _abstract(models.Arch("cnn", 1, 24, 8, norm="group")).blocks[0]
    assert block.norm.num_groups == 8
    assert models.group_count(12) == 4 and models.group_count(5) == 1


def test_residual_skips_are_identities_or_projections():
    same = _shapes(models.Arch("mlp", 3, 16, 8, residual=True))
    assert not any("skip" in path for path in same)  # equal widths: identity, no parameters
    grown = _shapes(models.Arch("cnn", 3, 4, 8, residual=True, width_growth=2.0))
    assert not any(path.startswith("blocks/0/skip") for path in grown)  # block 0 reads the image
    assert grown["blocks/1/skip/kernel"] == (4, 8)  # a 1x1 projection, 4 -> 8 channels
    assert grown["blocks/2/skip/kernel"] == (8, 16)
    assert grown["blocks/2/layer/kernel"] == (3, 3, 8, 16)
    assert grown["embedding/kernel"] == (4 * 4 * 16, 8)


# The function of each field -------------------------------------------------------------------

_BASE_CNN = models.Arch("cnn", 2, 8, 8)
_BASE_MLP = models.Arch("mlp", 2, 16, 8)
_VARIANTS = [
    models.Arch("cnn", 2, 8, 8, kernel_size=5),
    models.Arch("cnn", 2, 8, 8, kernel_size=1),
    models.Arch("cnn", 2, 8, 8, downsample="alternate"),
    models.Arch("cnn", 2, 8, 8, norm="layer"),
    models.Arch("cnn", 2, 8, 8, norm="group"),
    models.Arch("cnn", 2, 8, 8, residual=True),
    models.Arch("mlp", 2, 16, 8, norm="layer"),
    models.Arch("mlp", 2, 16, 8, residual=True),
    models.Arch("mlp", 2, 16, 8, width_growth=2.0),
]


def _filled(module, seed=0):
    """``(graphdef, state)`` of an abstract module with random parameters drawn by NumPy.

    Tests fill parameters on the host rather than run the model's init: compiling the truncated
    normal init costs seconds per architecture here, and these tests are about the forward pass.
    """
    graphdef, state = nnx.split(module)
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        if path[-1] == "log_rate":
            return np.full(leaf.shape, math.log(0.2), np.float32)
        fan_in = math.prod(leaf.shape[:-1]) if leaf.ndim > 1 else 1
        return (rng.normal(size=leaf.shape) / math.sqrt(fan_in)).astype(np.float32)

    pure = nnx.to_pure_dict(state)
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(
        lambda path, leaf: fill([getattr(k, "key", k) for k in path], leaf), pure))  # fmt: skip
    return graphdef, state


_forward = jax.jit(
    lambda state, images, graphdef: nnx.merge(graphdef, state).logits(images),
    static_argnums=2,
)


@pytest.mark.parametrize("arch", _VARIANTS, ids=lambda arch: arch.short())
def test_each_block_field_changes_the_function(arch):
    images = jax.random.uniform(jax.random.key(1), (4, 8, 8, 1))
    base = _BASE_CNN if arch.backbone == "cnn" else _BASE_MLP
    # The same parameters where the shapes agree: the base's, with the variant's extras.
    graphdef, state = _filled(_abstract(arch))
    base_graphdef, base_state = _filled(_abstract(base))
    out = _forward(state, images, graphdef)
    assert out.shape == (4, NUM_CLASSES) and np.all(np.isfinite(out))
    assert not np.allclose(out, _forward(base_state, images, base_graphdef), atol=1e-4)


def _layer_norm(y, scale, bias, axes, eps=1e-6):
    mean = y.mean(axis=axes, keepdims=True)
    var = ((y - mean) ** 2).mean(axis=axes, keepdims=True)
    return (y - mean) / np.sqrt(var + eps) * scale + bias


def _gelu(x):
    """GELU, tanh form (``jax.nn.gelu``'s default), written out in NumPy."""
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


@pytest.mark.parametrize("norm", ["layer", "group"])
def test_block_is_layer_norm_gelu_dropout_plus_skip(norm):
    """Claim 2 in every block: the feature layer, GELU and exp(r) dropout, here with a norm and a
    projected skip, checked against the formula written out."""
    rate = 0.3
    abstract = nnx.eval_shape(
        lambda: models.FeatureBlock(
            "conv", 4, 8, math.log(rate), norm=norm, residual=True, rngs=nnx.Rngs(0)
        )
    )
    graphdef, state = _filled(abstract, seed=2)
    block = nnx.merge(graphdef, state)
    block.dropout.log_rate[...] = jnp.float32(math.log(rate))
    x, key = jax.random.normal(jax.random.key(4), (64, 6, 6, 4)), jax.random.key(5)

    @jax.jit
    def outputs(state, x, key):
        block = nnx.merge(graphdef, state)
        return block.layer(x), block(x), block(x, key)

    y, out, out_dropped = (np.asarray(a, np.float64) for a in outputs(nnx.state(block), x, key))
    scale, bias = np.asarray(block.norm.scale[...]), np.asarray(block.norm.bias[...])
    # layer: over the channels of each position; group: 8 channels in 8 groups of one, so over
    # each channel's positions.
    normed = _layer_norm(y, scale, bias, axes=-1 if norm == "layer" else (1, 2))
    skip = np.asarray(x) @ np.asarray(block.skip.kernel[...]) + np.asarray(block.skip.bias[...])
    branch = _gelu(normed)
    np.testing.assert_allclose(out, branch + skip, rtol=1e-4, atol=1e-4)
    # With a key, the branch (not the skip) loses a fraction exp(r) of its units, rescaled.
    dropped = np.asarray(out_dropped - skip)
    zero = np.isclose(dropped, 0.0, atol=1e-6) & ~np.isclose(branch, 0.0, atol=1e-6)
    assert abs(zero.mean() - rate) < 0.03
    kept = ~np.isclose(dropped, 0.0, atol=1e-6)
    np.testing.assert_allclose(dropped[kept], branch[kept] / (1 - rate), rtol=1e-3,
                               atol=1e-4)  # fmt: skip


@pytest.mark.parametrize("arch", [*_VARIANTS, models.Arch("cnn", 3, 4, 4, residual=True,
                                                          width_growth=2.0)],
                         ids=lambda arch: arch.short())  # fmt: skip
def test_every_block_keeps_gelu_and_exp_dropout(arch):
    model = _abstract(arch)
    assert len(model.blocks) == arch.depth
    for block, width in zip(model.blocks, arch.widths, strict=True):
        assert isinstance(block.dropout, models.ExpDropout)
        assert block.layer.bias.shape == (width,)
    rates = nnx.to_flat_state(nnx.state(model, models.LogRate))
    assert len(rates) == arch.depth


@pytest.mark.parametrize(
    ("input_shape", "arch"),
    [
        ((28, 28, 1), models.Arch("cnn", 2, 4, 8, downsample="alternate", norm="group")),
        ((32, 32, 3), models.Arch("cnn", 2, 4, 8, residual=True, width_growth=2.0)),
    ],
)
def test_28_and_32_pixel_inputs_train_a_step(input_shape, arch):
    graphdef, state = _filled(_abstract(arch, input_shape))
    images = jax.random.uniform(jax.random.key(1), (8, *input_shape))
    labels = jnp.arange(8) % NUM_CLASSES
    params, rest = nnx.split_state(state, nnx.Param, ...)

    @jax.jit
    def loss_and_grads(params):
        def loss(p):
            logits = nnx.merge(graphdef, p, rest).logits(images, jax.random.key(2))
            return jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(8), labels]) * -1

        return jax.value_and_grad(loss)(params)

    value, grads = loss_and_grads(params)
    assert np.isfinite(value)
    assert all(np.all(np.isfinite(g)) and np.any(g != 0) for g in jax.tree.leaves(grads))


# Padding ----------------------------------------------------------------------------------------


def test_normalized_architectures_keep_their_block_widths():
    space = {"width": (16, 64), "embed_dim": (8, 32)}
    assert padding.bucket(models.Arch("mlp", 2, 16, 8), space) == models.Arch("mlp", 2, 64, 32)
    # A norm's statistics would count padded units: block widths stay, the embedding pads.
    normed = models.Arch("mlp", 2, 16, 8, norm="layer")
    assert padding.bucket(normed, space) == models.Arch("mlp", 2, 16, 32, norm="layer")
    grown = models.Arch("mlp", 2, 16, 8, residual=True, width_growth=0.5)
    assert padding.bucket(grown, space).widths == (64, 32)


def test_padded_init_of_a_normalized_bucket_is_the_model_init():
    """Norm scales start at one and biases at zero, as in nnx; kernels on the real fan-in."""
    arch = models.Arch("mlp", 2, 16, 8, norm="layer", residual=True, width_growth=2.0)
    bucket = padding.bucket(arch, {"embed_dim": (8, 32)})
    params_shape, _ = jax.eval_shape(
        lambda: steps.init_instance(bucket, (8, 8, 1), NUM_CLASSES, jax.random.key(0), -1.0)
    )
    mask = padding.masks(params_shape, bucket, padding.RealSizes.one(arch))
    params = padding.init(params_shape, mask, jax.random.key(1))
    own = padding.unpad(nnx.to_pure_dict(params), bucket, arch)
    for i in range(2):
        np.testing.assert_array_equal(own["blocks"][i]["norm"]["scale"], np.ones(arch.widths[i]))
        np.testing.assert_array_equal(own["blocks"][i]["norm"]["bias"], np.zeros(arch.widths[i]))
    assert own["blocks"][1]["skip"]["kernel"].shape == (16, 32)
    assert own["embedding"]["kernel"].shape == (32, 8)
    # The padded embedding columns are zero, the real ones drawn.
    kernel = np.asarray(params["embedding"]["kernel"][...])
    assert np.all(kernel[:, 8:] == 0) and np.all(kernel[:, :8] != 0)


def test_engine_trains_block_fields_and_keeps_the_unpadded_instance(digits):
    """A residual MLP with per-block widths trains padded; the kept (cut) instance scores on
    validation exactly what the padded one recorded in training."""
    from jaxes import infer, sharding, train
    from tests.test_train import _train_config

    config = _train_config()
    config.max_epochs = 3
    grown = models.Arch("mlp", 2, 8, 8, residual=True, width_growth=2.0)  # widths 8, 16
    engine = train.Engine(digits, config, space={"width": (8, 16), "embed_dim": (8, 16)})
    result = engine.train([train.Job(grown, jax.random.key(0), 3e-3, 0.0)])[0]
    assert result.bucket == models.Arch("mlp", 2, 16, 16, residual=True, width_growth=2.0)
    assert not result.failed and result.epochs == 3
    assert result.state["blocks"][1]["skip"]["kernel"][...].shape == (8, 16)
    evaluator = infer.Evaluator(result.graphdef, digits.spec, sharding.make_mesh(), 512)
    val = evaluator.evaluate(result.state, digits.validation)
    assert val["accuracy"] == result.metrics["val_accuracy"] > 0.2  # and it learned something
    assert val["loss"] == pytest.approx(result.metrics["val_loss"], abs=1e-5)


def test_padded_init_draws_grown_blocks_and_skips_on_their_real_fan_in():
    arch = models.Arch("mlp", 2, 24, 8, residual=True, width_growth=2.0)  # widths 24, 48
    bucket = models.Arch("mlp", 2, 64, 32, residual=True, width_growth=2.0)  # widths 64, 128
    params_shape, _ = jax.eval_shape(
        lambda: steps.init_instance(bucket, (8, 8, 1), NUM_CLASSES, jax.random.key(0), -1.0)
    )
    mask = padding.masks(params_shape, bucket, padding.RealSizes.one(arch))
    own = padding.unpad(nnx.to_pure_dict(padding.init(params_shape, mask, jax.random.key(3))),
                        bucket, arch)  # fmt: skip
    for name in ("layer", "skip"):  # both read block 0's 24 real units
        kernel = own["blocks"][1][name]["kernel"]
        assert kernel.shape == (24, 48)
        # lecun_normal on the real fan-in: std 1/sqrt(24); 1,152 draws estimate it to ~2%.
        assert np.std(kernel) == pytest.approx(1 / math.sqrt(24), rel=0.08)
