"""Evaluation and embedding of a trained instance in fixed-size batches.

Every call runs the same compiled program whatever the number of examples: the last batch is
padded and masked, so evaluation and embedding never recompile for a new N.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxes import data as data_lib
from jaxes import sharding


@functools.lru_cache(maxsize=64)
def _compiled(graphdef, spec: data_lib.InputSpec, mesh):
    rep, batch = sharding.replicated(mesh), sharding.batch_sharded(mesh)

    def evaluate(state, images, labels, mask):
        logits = nnx.merge(graphdef, state).logits(data_lib.normalize(images, spec))
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
        correct = jnp.argmax(logits, axis=-1) == labels
        return jnp.sum(jnp.where(mask, losses, 0.0)), jnp.sum(jnp.where(mask, correct, 0))

    def embed(state, images):
        return nnx.merge(graphdef, state).embed(data_lib.normalize(images, spec))

    return (
        jax.jit(evaluate, in_shardings=(rep, batch, batch, batch), out_shardings=(rep, rep)),
        jax.jit(embed, in_shardings=(rep, batch), out_shardings=rep),
    )


def _padded_batches(arrays, batch_size: int):
    """Yields (batch arrays, number of real rows), zero-padding the last batch."""
    n = len(arrays[0])
    for start in range(0, n, batch_size):
        real = min(batch_size, n - start)
        out = []
        for a in arrays:
            chunk = a[start : start + real]
            if real < batch_size:
                pad = np.zeros((batch_size - real, *a.shape[1:]), a.dtype)
                chunk = np.concatenate([chunk, pad])
            out.append(chunk)
        yield out, real


class Evaluator:
    """Evaluates and embeds with one graph on one mesh.

    Args:
      graphdef: the model graph (from ``nnx.split``).
      spec: the input spec (normalization).
      mesh: the device mesh.
      batch_size: rows per compiled call; rounded up to a multiple of the data axis.
    """

    def __init__(self, graphdef, spec: data_lib.InputSpec, mesh, batch_size: int):
        self.mesh = mesh
        size = sharding.data_size(mesh)
        self.batch_size = -(-batch_size // size) * size
        self._evaluate, self._embed = _compiled(graphdef, spec, mesh)

    def evaluate(self, state, split: data_lib.Split) -> dict:
        """Mean cross-entropy loss and accuracy of ``state`` on ``split``."""
        batch = sharding.batch_sharded(self.mesh)
        loss_sum, correct = 0.0, 0
        for (images, labels), real in _padded_batches(
            (split.images, split.labels), self.batch_size
        ):
            mask = np.arange(self.batch_size) < real
            loss, hits = self._evaluate(
                state, *(sharding.put(a, batch) for a in (images, labels, mask))
            )
            loss_sum, correct = loss_sum + loss, correct + hits
        n = len(split.labels)
        return {"loss": float(loss_sum) / n, "accuracy": float(correct) / n}

    def embed(self, state, images: np.ndarray) -> np.ndarray:
        """The (N, D) float32 embeddings of uint8 images (N, H, W, C)."""
        batch = sharding.batch_sharded(self.mesh)
        out = []
        for (chunk,), real in _padded_batches((images,), self.batch_size):
            emb = self._embed(state, sharding.put(chunk, batch))
            out.append(np.asarray(jax.device_get(emb))[:real])
        return np.concatenate(out).astype(np.float32)


# The (chunk, N_train) float32 similarity block of one kNN step stays under this many bytes, so
# 10,000 x 60,000 needs ~64 MiB of scratch, not the 2.4 GB (float32) of a dense matrix.
KNN_BLOCK_BYTES = 64 * 2**20


def _unit_rows(x) -> np.ndarray:
    """float32 rows scaled to unit L2 norm (a zero row stays zero)."""
    x = np.asarray(x, np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-12))


def nearest(train_emb, test_emb, k: int = 1, *, block_bytes: int = KNN_BLOCK_BYTES) -> np.ndarray:
    """The indices of each test row's ``k`` nearest train rows by cosine similarity, nearest first.

    Works in test chunks sized so one (chunk, N_train) float32 block fits ``block_bytes``: memory
    is O(N_train * D + block_bytes), never O(N_test * N_train). Among equal similarities the
    lower train index comes first (for k > 1, within the k kept).

    Args:
      train_emb: (N_train, D) embeddings (any float dtype; computed in float32).
      test_emb: (N_test, D) embeddings.
      k: neighbours per test row, 1 <= k <= N_train.
      block_bytes: the scratch budget of one similarity block.

    Returns:
      int64 array (N_test, k).
    """
    train = _unit_rows(train_emb)
    test = np.asarray(test_emb)
    if not 1 <= k <= len(train):
        raise ValueError(f"k must be in [1, {len(train)}] (the train rows), got {k}.")
    chunk = max(1, block_bytes // (4 * max(1, len(train))))
    out = np.empty((len(test), k), np.int64)
    for start in range(0, len(test), chunk):
        sims = _unit_rows(test[start : start + chunk]) @ train.T
        if k == 1:
            out[start : start + chunk, 0] = np.argmax(sims, axis=1)  # first max: lowest index
            continue
        if k < sims.shape[1]:  # the k best in O(N_train), then only those sorted
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        else:
            top = np.broadcast_to(np.arange(sims.shape[1]), sims.shape)
        picked = np.take_along_axis(sims, top, axis=1)
        order = np.lexsort((top, -picked), axis=1)
        out[start : start + chunk] = np.take_along_axis(top, order, axis=1)
    return out


def knn_top1(train_emb, train_labels, test_emb, test_labels, **kwargs) -> float:
    """Top-1 accuracy of 1-nearest-neighbour (cosine) classification of test against train.

    Chunked float32 (see ``nearest``); keyword arguments go to ``nearest``.
    """
    index = nearest(train_emb, test_emb, 1, **kwargs)[:, 0]
    return float(np.mean(np.asarray(train_labels)[index] == np.asarray(test_labels)))
