"""Models of claim 2: feature blocks of (Dense | Conv) -> GELU -> dropout with rate exp(r).

A model is built from an :class:`Arch` (what the architecture search chooses), the data's input
spec, and a dropout log-rate drawn per instance. The log-rate lives in the model state as a
non-trainable :class:`LogRate` variable, so instances of one ``Arch`` with different rates share
one compiled program.

A block is ``layer -> [norm] -> GELU -> ExpDropout [+ skip]``: the feature layer, GELU and the
``exp(r)`` dropout of claim 2 are always there; the normalization, the residual skip, the CNN
kernel size, the downsampling schedule and the per-block widths are ``Arch`` fields whose
defaults are the original blocks (so metadata written before they existed loads unchanged).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence

import jax
from flax import nnx

from jaxes import backbones

# The blocks live in jaxes.blocks; models is where callers find them, with the backbones.
from jaxes.blocks import (  # noqa: F401
    NORMS,
    ConvSame,
    ExpDropout,
    FeatureBlock,
    LogRate,
    check_log_rate,
    group_count,
)

BACKBONES = ("mlp", "cnn")
# Where a CNN halves its resolution (2x2 average pool after a block, while the side is >= 8):
# "every" block (the original rule), every second block counting back from the last (so the
# last block always pools), or never.
DOWNSAMPLES = ("every", "alternate", "none")
# The block fields of ``Arch`` (issue #11); each default is the original block.
BLOCK_FIELDS = ("kernel_size", "downsample", "norm", "residual", "width_growth")
# Fields that only a CNN reads. An MLP ignores them and ``Arch`` resets them to their defaults,
# so two MLPs that differ only there are one architecture (dedup and program caches stay exact).
CNN_ONLY = ("kernel_size", "downsample")


@dataclasses.dataclass(frozen=True)
class Arch:
    """An architecture: hashable, JSON round-trip exact, validated and canonical on construction.

    Attributes:
      backbone: "mlp" (dense blocks on the flattened image) or "cnn" (conv blocks).
      depth: number of feature blocks, >= 1.
      width: units (mlp) or channels (cnn) of the first block, >= 1.
      embed_dim: size of the feature vector that ``embed`` returns, >= 1.
      kernel_size: (cnn) the odd side of each conv kernel, 1 to 7.
      downsample: (cnn) the pooling schedule, one of ``DOWNSAMPLES``.
      norm: normalization after each feature layer: "none", "layer" (over a block's units; for
        a CNN over the channels of each position) or "group" (groups of units or channels).
      residual: add each block's input to its output, from the second block on (the first one
        reads the image): identity where the widths agree, a learned 1x1 projection elsewhere.
      width_growth: block ``i`` has ``round(width * width_growth**i)`` units (``widths``);
        1.0 keeps every block at ``width``, 2.0 doubles it per block, 0.5 halves it.
      options: a registered backbone's own fields (``jaxes.backbones``), as sorted
        ``(name, value)`` pairs; empty for the built-in backbones, whose other fields a
        registered one ignores (``to_dict`` leaves them out).
    """

    backbone: str = "mlp"
    depth: int = 2
    width: int = 256
    embed_dim: int = 64
    # --- Block fields (issue #11). Defaults are the original blocks: old dicts load as before.
    kernel_size: int = 3
    downsample: str = "every"
    norm: str = "none"
    residual: bool = False
    width_growth: float = 1.0
    # --- End of block fields.
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
        self._check_blocks()

    def _check_blocks(self):
        """Validates the block fields and resets those that do not apply (canonical form)."""
        k = self.kernel_size
        if isinstance(k, bool) or not isinstance(k, int) or k not in (1, 3, 5, 7):
            raise ValueError(f"Arch.kernel_size must be one of 1, 3, 5, 7 (odd), got {k!r}.")
        if self.downsample not in DOWNSAMPLES:
            raise ValueError(
                f"Arch.downsample must be one of {DOWNSAMPLES}, got {self.downsample!r}."
            )
        if self.norm not in NORMS:
            raise ValueError(f"Arch.norm must be one of {NORMS}, got {self.norm!r}.")
        if not isinstance(self.residual, bool):
            raise ValueError(f"Arch.residual must be True or False, got {self.residual!r}.")
        growth = self.width_growth
        number = isinstance(growth, int | float) and not isinstance(growth, bool)
        if not (number and math.isfinite(growth) and 0.125 <= growth <= 8):
            raise ValueError(f"Arch.width_growth must be a number in [0.125, 8], got {growth!r}.")
        canonical = {"width_growth": float(growth)}
        if self.backbone != "cnn":
            canonical |= {f.name: f.default for f in dataclasses.fields(self) if f.name in CNN_ONLY}
        if not self.builtin:  # a registered backbone reads only its options
            canonical |= {
                f.name: f.default for f in dataclasses.fields(self) if f.name in BLOCK_FIELDS
            }
        if self.depth == 1:  # one block: no skip (it reads the image) and no growth
            canonical |= {"residual": False, "width_growth": 1.0}
        for name, value in canonical.items():
            object.__setattr__(self, name, value)

    @property
    def builtin(self) -> bool:
        """Whether ``Model`` builds it (else a registered backbone does, unpadded)."""
        return self.backbone in BACKBONES

    @property
    def widths(self) -> tuple[int, ...]:
        """The width of each block: ``round(width * width_growth**i)``, at least 1."""
        return tuple(
            max(1, math.floor(self.width * self.width_growth**i + 0.5)) for i in range(self.depth)
        )

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict; block fields at their defaults are left out, so an
        original block has the dict it had before they existed (old records compare equal)."""
        if not self.builtin:
            return {"backbone": self.backbone, "options": dict(self.options)}
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.name in BLOCK_FIELDS}
        return {
            k: v
            for k, v in dataclasses.asdict(self).items()
            if k != "options" and not (k in defaults and v == defaults[k])
        }

    @classmethod
    def from_dict(cls, d: dict) -> Arch:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"Arch has no field(s) {unknown}; valid fields are {sorted(names)}.")
        return cls(**d)

    def short(self) -> str:
        """A compact label, e.g. ``mlp-2x256-e64`` (block fields appear when not the default)
        or ``mixer(blocks=2,patch=2)``."""
        if not self.builtin:
            return f"{self.backbone}({','.join(f'{k}={v}' for k, v in self.options)})"
        label = f"{self.backbone}-{self.depth}x{self.width}-e{self.embed_dim}"
        if self.kernel_size != 3:
            label += f"-k{self.kernel_size}"
        if self.downsample != "every":
            label += f"-pool:{self.downsample}"
        if self.norm != "none":
            label += f"-{self.norm}norm"
        if self.residual:
            label += "-res"
        if self.width_growth != 1.0:
            label += f"-grow{self.width_growth:g}"
        return label

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def _block_keys(key, n):
    return [None] * n if key is None else [jax.random.fold_in(key, i) for i in range(n)]


def _pools(arch: Arch, index: int) -> bool:
    """Whether the downsampling schedule pools after block ``index`` (before the size rule)."""
    if arch.downsample == "every":
        return True
    if arch.downsample == "alternate":
        return (arch.depth - 1 - index) % 2 == 0
    return False


def pool_schedule(arch: Arch, input_shape: Sequence[int]) -> tuple[bool, ...]:
    """Whether each block of a CNN ``arch`` is followed by a 2x2 average pool on ``input_shape``
    (the schedule, while the side is at least 8); all False for an MLP."""
    height, width = input_shape[:2]
    pools = []
    for index in range(arch.depth):
        pool = arch.backbone == "cnn" and _pools(arch, index) and min(height, width) >= 8
        pools.append(pool)
        if pool:
            height, width = height // 2, width // 2
    return tuple(pools)


class Model(nnx.Module):
    """Backbone of feature blocks -> embedding (the feature vector) -> classifier head.

    Input: float32 images (N, H, W, C), already normalized by ``data.normalize``.
    """

    def __init__(self, arch: Arch, input_shape: Sequence[int], num_classes: int, log_rate, *, rngs):
        height, width, channels = input_shape
        self.arch = arch
        blocks = []
        kind = "dense" if arch.backbone == "mlp" else "conv"
        features = height * width * channels if kind == "dense" else channels
        options = {"kernel_size": arch.kernel_size, "norm": arch.norm, "rngs": rngs}
        # A CNN halves its resolution by the schedule, while the side is at least 8, so 8x8
        # digits end at 4x4, 28x28 at 7x7 and 32x32 at 4x4 and deep stacks stay cheap.
        pools = pool_schedule(arch, input_shape)
        for index, out in enumerate(arch.widths):
            residual = arch.residual and index > 0
            blocks.append(FeatureBlock(kind, features, out, log_rate, residual=residual, **options))
            if pools[index]:
                height, width = height // 2, width // 2
            features = out
        if kind == "conv":
            features = height * width * features
        self.blocks = nnx.List(blocks)
        self.pools = pools
        self.embedding = nnx.Linear(features, arch.embed_dim, rngs=rngs)
        self.head = nnx.Linear(arch.embed_dim, num_classes, rngs=rngs)

    def embed(
        self, images: jax.Array, key: jax.Array | None = None, gates: Sequence | None = None
    ) -> jax.Array:
        """The feature vector (N, embed_dim) of each image; ``key=None`` means eval mode.

        ``gates`` (a depth-padded bucket's, ``padding.gates``): one traced bool per block; a
        block whose gate is False is skipped (``lax.cond``: its input passes on unchanged).
        """
        x = images
        if self.arch.backbone == "mlp":
            x = x.reshape(x.shape[0], -1)
        blocks = zip(self.blocks, self.pools, _block_keys(key, len(self.blocks)), strict=True)
        for index, (block, pool, block_key) in enumerate(blocks):
            if gates is None or index == 0:
                x = block(x, block_key)
            else:
                x = jax.lax.cond(gates[index], lambda x, b=block, k=block_key: b(x, k),
                                 lambda x: x, x)  # fmt: skip
            if pool:
                x = nnx.avg_pool(x, (2, 2), strides=(2, 2))
        return self.embedding(x.reshape(x.shape[0], -1))

    def logits(
        self, images: jax.Array, key: jax.Array | None = None, gates: Sequence | None = None
    ) -> jax.Array:
        """Class logits (N, num_classes), from the embedding."""
        return self.head(self.embed(images, key, gates))

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
