"""The PRNG tree of a run (docs/design.md §4).

One root, ``jax.random.key(seed)``. Every stream is a ``fold_in`` of its parent with a named
constant, never a product of call order, so a resumed run replays exactly the keys of an
uninterrupted one and adding a stream never shifts another.

    root ─┬─ ROUNDS ─── round t ─┬─ ARCH          architecture sample
          │                      ├─ INIT          parameter init
          │                      ├─ DROPOUT_RATE  the instance's dropout log-rate
          │                      ├─ DATA          data order, fold_in(epoch)
          │                      └─ DROPOUT       per-step masks, fold_in(step)
          └─ TOLERANCE          the tolerance draw r
"""

from __future__ import annotations

import dataclasses
import math

import jax

# Stream constants. Distinct integers, stable forever: changing one changes every run.
ROUNDS = 1
TOLERANCE = 2
ARCH = 11
INIT = 12
DROPOUT_RATE = 13
DATA = 14
DROPOUT = 15


def root(seed: int) -> jax.Array:
    """The typed root key of a run."""
    return jax.random.key(seed)


@dataclasses.dataclass(frozen=True)
class RoundKeys:
    """The keys of one round, each a separate named stream of the round key."""

    arch: jax.Array
    init: jax.Array
    dropout_rate: jax.Array
    data: jax.Array
    dropout: jax.Array

    @classmethod
    def of(cls, round_key: jax.Array) -> RoundKeys:
        """Splits a round key into its named streams."""
        fold = jax.random.fold_in
        return cls(
            arch=fold(round_key, ARCH),
            init=fold(round_key, INIT),
            dropout_rate=fold(round_key, DROPOUT_RATE),
            data=fold(round_key, DATA),
            dropout=fold(round_key, DROPOUT),
        )


def round_key(root_key: jax.Array, round_index: int) -> jax.Array:
    """``key_t = fold_in(fold_in(root, ROUNDS), t)``."""
    return jax.random.fold_in(jax.random.fold_in(root_key, ROUNDS), round_index)


def epoch_key(data_key: jax.Array, epoch: int) -> jax.Array:
    """The data-order key of one epoch."""
    return jax.random.fold_in(data_key, epoch)


def tolerance_r(root_key: jax.Array) -> float:
    """The tolerance exponent ``r = ln(1 - u)``, ``u ~ U[0, 1)``, so ``r <= 0`` and finite."""
    u = float(jax.random.uniform(jax.random.fold_in(root_key, TOLERANCE), dtype="float32"))
    return math.log(1.0 - u)
