"""Models of claim 2: feature blocks of (Dense | Conv) -> GELU -> dropout with rate exp(r).

A model is built from an :class:`Arch` (what the architecture search chooses), the data's input
spec, and a dropout log-rate drawn per instance. The log-rate lives in the model state as a
non-trainable :class:`LogRate` variable, so instances of one ``Arch`` with different rates share
one compiled program.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxes import backbones

BACKBONES = ("mlp", "cnn")


@dataclasses.dataclass(frozen=True)
class Arch:
    """An architecture: hashable, JSON round-trip exact, validated on construction.

    Attributes:
      backbone: "mlp" (dense blocks on the flattened image) or "cnn" (3x3 conv blocks).
      depth: number of feature blocks, >= 1.
      width: units (mlp) or channels (cnn) of each block, >= 1.
      embed_dim: size of the feature vector that ``embed`` returns, >= 1.
      options: a registered backbone's own fields (``jaxes.backbones``), as sorted
        ``(name, value)`` pairs; empty for the built-in backbones, whose other fields a
        registered one ignores (``to_dict`` leaves them out).
    """

    backbone: str = "mlp"
    depth: int = 2
    width: int = 256
    embed_dim: int = 64
    options: tuple = ()

    def __post_init__(self):
        options = self.options
        pairs = options.items() if isinstance(options, Mapping) else options
        object.__setattr__(self, "options", tuple(sorted((str(k), v) for k, v in pairs)))
        if self.backbone not in BACKBONES:
            if not backbones.is_registered(self.backbone):
                raise ValueError(
                    f"Arch.backbone must be one of {BACKBONES} or a registered backbone "
                    f"{backbones.names()}, got {self.backbone!r}."
                )
        elif self.options:
            raise ValueError(f"Arch.options is for registered backbones, not {self.backbone!r}.")
        for name in ("depth", "width", "embed_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Arch.{name} must be an int >= 1, got {value!r}.")

    @property
    def builtin(self) -> bool:
        """Whether ``Model`` builds it (else a registered backbone does, unpadded)."""
        return self.backbone in BACKBONES

    def to_dict(self) -> dict:
        if not self.builtin:
            return {"backbone": self.backbone, "options": dict(self.options)}
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "options"}

    @classmethod
    def from_dict(cls, d: dict) -> Arch:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"Arch has no field(s) {unknown}; valid fields are {sorted(names)}.")
        return cls(**d)

    def short(self) -> str:
        """A compact label, e.g. ``mlp-2x256-e64`` or ``mixer(blocks=2,patch=2)``."""
        if not self.builtin:
            return f"{self.backbone}({','.join(f'{k}={v}' for k, v in self.options)})"
        return f"{self.backbone}-{self.depth}x{self.width}-e{self.embed_dim}"

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


class LogRate(nnx.Variable):
    """The dropout log-rate: state, never trained."""


def check_log_rate(log_rate: float) -> float:
    """Returns ``log_rate`` as float if it is finite and strictly negative, else raises."""
    log_rate = float(log_rate)
    if not (math.isfinite(log_rate) and log_rate < 0.0):
        raise ValueError(
            f"log_rate must be finite and < 0 (drop probability exp(log_rate) < 1), got {log_rate}."
        )
    return log_rate


class ExpDropout(nnx.Module):
    """Dropout whose drop probability is ``exp(log_rate)``, ``log_rate < 0`` (claim 2).

    With ``key=None`` it is the identity (evaluation). Otherwise each unit is zeroed with
    probability ``exp(log_rate)`` and the survivors are scaled by ``1 / (1 - exp(log_rate))``.
    The key is explicit, so the same key always gives the same mask.
    """

    def __init__(self, log_rate: float):
        self.log_rate = LogRate(jnp.asarray(check_log_rate(log_rate), jnp.float32))

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        if key is None:
            return x
        keep = 1.0 - jnp.exp(self.log_rate[...])
        mask = jax.random.bernoulli(key, keep, x.shape)
        return jnp.where(mask, x / keep, jnp.zeros_like(x))


class Conv3x3(nnx.Module):
    """A 3x3 convolution, stride 1, "SAME" padding: nine shifted slices, then one matmul.

    Parameters and result are those of ``nnx.Conv(in, out, (3, 3))``. It avoids XLA:CPU's
    convolution kernels: a two-conv gradient step took 38.5 ms with them and 24.0 ms like this as
    a jitted step, and 1105 ms against 24.5 ms per step inside a ``lax.scan`` (jax-ml/jax#12868),
    so CNN epochs can scan on CPU too (benchmarks/README.md).
    """

    def __init__(self, in_features: int, out_features: int, *, rngs):
        shape = (3, 3, in_features, out_features)
        self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), shape))
        self.bias = nnx.Param(jnp.zeros((out_features,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        height, width = x.shape[1:3]
        padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        # Channel order (row, col, in) matches the kernel's row-major (3, 3, in) flattening.
        patches = jnp.concatenate(
            [padded[:, i : i + height, j : j + width, :] for i in range(3) for j in range(3)],
            axis=-1,
        )
        kernel = self.kernel[...]
        return patches @ kernel.reshape(-1, kernel.shape[-1]) + self.bias[...]


class FeatureBlock(nnx.Module):
    """Dense or 3x3 Conv -> GELU -> ExpDropout."""

    def __init__(self, kind: str, in_features: int, out_features: int, log_rate: float, *, rngs):
        if kind == "dense":
            self.layer = nnx.Linear(in_features, out_features, rngs=rngs)
        elif kind == "conv":
            self.layer = Conv3x3(in_features, out_features, rngs=rngs)
        else:
            raise ValueError(f"FeatureBlock kind must be 'dense' or 'conv', got {kind!r}.")
        self.dropout = ExpDropout(log_rate)

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        return self.dropout(jax.nn.gelu(self.layer(x)), key)


def _block_keys(key, n):
    return [None] * n if key is None else [jax.random.fold_in(key, i) for i in range(n)]


class Model(nnx.Module):
    """Backbone of feature blocks -> embedding (the feature vector) -> classifier head.

    Input: float32 images (N, H, W, C), already normalized by ``data.normalize``.
    """

    def __init__(self, arch: Arch, input_shape: Sequence[int], num_classes: int, log_rate, *, rngs):
        height, width, channels = input_shape
        self.arch = arch
        blocks, pools = [], []
        if arch.backbone == "mlp":
            features = height * width * channels
            for _ in range(arch.depth):
                blocks.append(FeatureBlock("dense", features, arch.width, log_rate, rngs=rngs))
                pools.append(False)
                features = arch.width
        else:
            features = channels
            for _ in range(arch.depth):
                blocks.append(FeatureBlock("conv", features, arch.width, log_rate, rngs=rngs))
                # Halve the resolution while it is at least 8, so deep stacks stay cheap.
                pool = min(height, width) >= 8
                pools.append(pool)
                if pool:
                    height, width = height // 2, width // 2
                features = arch.width
            features = height * width * arch.width
        self.blocks = nnx.List(blocks)
        self.pools = tuple(pools)
        self.embedding = nnx.Linear(features, arch.embed_dim, rngs=rngs)
        self.head = nnx.Linear(arch.embed_dim, num_classes, rngs=rngs)

    def embed(self, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """The feature vector (N, embed_dim) of each image; ``key=None`` means eval mode."""
        x = images
        if self.arch.backbone == "mlp":
            x = x.reshape(x.shape[0], -1)
        for block, pool, block_key in zip(
            self.blocks, self.pools, _block_keys(key, len(self.blocks)), strict=True
        ):
            x = block(x, block_key)
            if pool:
                x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
        return self.embedding(x.reshape(x.shape[0], -1))

    def logits(self, images: jax.Array, key: jax.Array | None = None) -> jax.Array:
        """Class logits (N, num_classes), from the embedding."""
        return self.head(self.embed(images, key))

    __call__ = logits


def draw_log_rate(key: jax.Array, rate_range: Sequence[float]) -> float:
    """Draws ``log_rate`` log-uniformly so that the drop rate lies in ``rate_range``.

    Args:
      key: the round's dropout-rate key.
      rate_range: (low, high) with 0 < low <= high < 1.

    Returns:
      ``log_rate`` in ``[ln low, ln high]`` as a Python float (< 0).
    """
    low, high = (float(v) for v in rate_range)
    if not (0.0 < low <= high < 1.0):
        raise ValueError(f"dropout rate range must satisfy 0 < low <= high < 1, got {rate_range}.")
    u = float(jax.random.uniform(key, dtype="float32"))
    return math.log(low) + u * (math.log(high) - math.log(low))


def build(arch: Arch, input_shape, num_classes: int, key: jax.Array, log_rate: float) -> Model:
    """Builds an instance with parameters initialized from ``key``.

    A registered backbone (``jaxes.backbones``) is built by its own function, which must put a
    ``LogRate`` (an ``ExpDropout``) in the model, as claim 2 asks.
    """
    if arch.builtin:
        return Model(arch, input_shape, num_classes, log_rate, rngs=nnx.Rngs(params=key))
    model = backbones.build(
        arch.backbone, dict(arch.options), input_shape, num_classes,
        log_rate=check_log_rate(log_rate), rngs=nnx.Rngs(params=key),
    )  # fmt: skip
    if not jax.tree.leaves(nnx.state(model, LogRate)):
        raise ValueError(
            f"backbone {arch.backbone!r} has no models.ExpDropout(log_rate); claim 2 wants each "
            "feature block to end in one, so add it."
        )
    return model
