"""The feature blocks of claim 2: a feature layer (Dense or k x k Conv), GELU, dropout exp(r).

``FeatureBlock`` is ``layer -> [LayerNorm | GroupNorm] -> GELU -> ExpDropout [+ skip]``; the
layer, GELU and the ``exp(r)`` dropout are always there. ``models`` builds backbones from them.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

NORMS = ("none", "layer", "group")
# The most groups of a group norm: 8 when the width divides by 8, else gcd(width, 8).
MAX_GROUPS = 8


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


class ConvSame(nnx.Module):
    """A ``k x k`` convolution, stride 1, "SAME" padding: ``k*k`` shifted slices, then one matmul.

    Parameters and result are those of ``nnx.Conv(in, out, (k, k))``. It avoids XLA:CPU's
    convolution kernels: a two-conv 3x3 gradient step took 38.5 ms with them and 24.0 ms like
    this as a jitted step, and 1105 ms against 24.5 ms per step inside a ``lax.scan``
    (jax-ml/jax#12868), so CNN epochs can scan on CPU too (benchmarks/README.md).
    """

    def __init__(self, in_features: int, out_features: int, kernel_size: int = 3, *, rngs):
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"ConvSame kernel_size must be odd and >= 1, got {kernel_size}.")
        shape = (kernel_size, kernel_size, in_features, out_features)
        self.kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), shape))
        self.bias = nnx.Param(jnp.zeros((out_features,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        k = kernel.shape[0]
        height, width = x.shape[1:3]
        half = k // 2
        padded = jnp.pad(x, ((0, 0), (half, half), (half, half), (0, 0)))
        # Channel order (row, col, in) matches the kernel's row-major (k, k, in) flattening.
        patches = jnp.concatenate(
            [padded[:, i : i + height, j : j + width, :] for i in range(k) for j in range(k)],
            axis=-1,
        )
        return patches @ kernel.reshape(-1, kernel.shape[-1]) + self.bias[...]


def group_count(width: int) -> int:
    """The number of groups of a group norm over ``width`` units: ``gcd(width, MAX_GROUPS)``."""
    return math.gcd(width, MAX_GROUPS)


class FeatureBlock(nnx.Module):
    """Dense or k x k Conv -> [LayerNorm | GroupNorm] -> GELU -> ExpDropout [+ skip].

    Args:
      kind: "dense" or "conv".
      in_features, out_features: units (channels) in and out.
      log_rate: the dropout log-rate (claim 2).
      kernel_size: the conv kernel's side (conv only).
      norm: one of ``NORMS``.
      residual: add the input (projected by a 1x1 layer when the widths differ) to the output.
    """

    def __init__(
        self, kind: str, in_features: int, out_features: int, log_rate: float, *,
        kernel_size: int = 3, norm: str = "none", residual: bool = False, rngs,
    ):  # fmt: skip
        if kind == "dense":
            self.layer = nnx.Linear(in_features, out_features, rngs=rngs)
        elif kind == "conv":
            self.layer = ConvSame(in_features, out_features, kernel_size, rngs=rngs)
        else:
            raise ValueError(f"FeatureBlock kind must be 'dense' or 'conv', got {kind!r}.")
        if norm == "layer":
            self.norm = nnx.LayerNorm(out_features, rngs=rngs)
        elif norm == "group":
            self.norm = nnx.GroupNorm(out_features, num_groups=group_count(out_features), rngs=rngs)
        elif norm != "none":
            raise ValueError(f"FeatureBlock norm must be one of {NORMS}, got {norm!r}.")
        else:
            self.norm = None
        self.dropout = ExpDropout(log_rate)
        # A 1x1 projection (a dense layer on the last axis) where the skip changes the width.
        project = residual and in_features != out_features
        self.skip = nnx.Linear(in_features, out_features, rngs=rngs) if project else None
        self.residual = residual

    def __call__(self, x: jax.Array, key: jax.Array | None = None) -> jax.Array:
        y = self.layer(x)
        if self.norm is not None:
            y = self.norm(y)
        y = self.dropout(jax.nn.gelu(y), key)
        if self.residual:
            y = y + (x if self.skip is None else self.skip(x))
        return y
