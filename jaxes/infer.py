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


def knn_top1(train_emb, train_labels, test_emb, test_labels) -> float:
    """Top-1 accuracy of 1-nearest-neighbour (cosine) classification of test against train."""

    def unit(x):
        x = np.asarray(x, np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    nearest = np.argmax(unit(test_emb) @ unit(train_emb).T, axis=1)
    return float(np.mean(np.asarray(train_labels)[nearest] == np.asarray(test_labels)))
