"""Chunked kNN (``infer.nearest``, ``infer.knn_top1``) against brute force, and the pictures of
``jaxes.vis``: neighbors.png and embedding.png."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from jaxes import data, infer, vis


def brute_force(train, test, k):
    """k nearest by cosine in float64, ties by lower index (a stable sort)."""
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    sims = unit(test.astype(np.float64)) @ unit(train.astype(np.float64)).T
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


@pytest.mark.parametrize("k", [1, 3, 7])
@pytest.mark.parametrize("block_bytes", [4 * 50, 4 * 50 * 13, 2**26])
def test_nearest_matches_brute_force_in_any_chunking(k, block_bytes):
    rng = np.random.default_rng(k)
    train = rng.normal(size=(50, 6)).astype(np.float32)
    test = rng.normal(size=(37, 6)).astype(np.float32)
    got = infer.nearest(train, test, k, block_bytes=block_bytes)
    np.testing.assert_array_equal(got, brute_force(train, test, k))


def test_nearest_breaks_ties_by_lower_index_and_ignores_scale():
    train = np.array([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]], np.float32)  # rows 0, 1: same direction
    test = np.array([[5.0, 0.1], [0.0, 3.0]], np.float32)
    np.testing.assert_array_equal(infer.nearest(train, test, 1), [[0], [2]])
    np.testing.assert_array_equal(infer.nearest(train, test, 3), [[0, 1, 2], [2, 0, 1]])
    with pytest.raises(ValueError, match="k must be in"):
        infer.nearest(train, test, 4)


def test_knn_top1_counts_correct_neighbours():
    train = np.array([[1, 0], [0, 1], [-1, 0]], np.float32)
    test = np.array([[0.9, 0.1], [0.1, 0.9], [-1, 0.2], [1, -0.1]], np.float32)
    assert infer.knn_top1(train, [0, 1, 2], test, [0, 1, 2, 2], block_bytes=8) == 0.75


def _toy_data(channels):
    rng = np.random.default_rng(channels)
    spec = data.InputSpec(height=8, width=8, channels=channels, num_classes=3)
    splits = {
        key: data.Split(rng.integers(0, 256, (n, 8, 8, channels), dtype=np.uint8), np.arange(n) % 3)
        for key, n in (("train", 30), ("validation", 6), ("test", 12))
    }
    return data.Data("toy", spec, class_names=("a", "b", "c"), **splits)


@pytest.mark.parametrize("channels", [1, 3])
def test_write_plots_draws_both_pictures(tmp_path, channels):
    toy = _toy_data(channels)
    rng = np.random.default_rng(0)
    # Embeddings that cluster by class, so t-SNE and the neighbours have structure to show.
    centres = rng.normal(size=(3, 5))
    train_emb = centres[toy.train.labels] + 0.1 * rng.normal(size=(30, 5))
    test_emb = centres[toy.test.labels] + 0.1 * rng.normal(size=(12, 5))
    paths = vis.write_plots(tmp_path, toy, train_emb, test_emb)
    assert [p.name for p in paths] == ["neighbors.png", "embedding.png"]
    for path in paths:
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width >= 600 and image.height >= 400
    # 10 query rows of 1 + 8 images: the figure grows with the grid.
    with Image.open(paths[0]) as image:
        assert image.height > 1000


def test_pick_queries_round_robins_over_classes():
    labels = np.array([2, 2, 0, 1, 0, 1, 2])
    np.testing.assert_array_equal(vis.pick_queries(labels, 5), [2, 3, 0, 4, 5])
    assert len(vis.pick_queries(labels, 50)) == len(labels)


def test_pca_projection_is_deterministic_and_sign_fixed():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 6)) * np.array([5, 3, 1, 1, 1, 1])
    first, flipped = vis.project(x, "pca"), vis.project(-x, "pca")
    np.testing.assert_allclose(first, flipped, atol=1e-9)
    assert np.var(first[:, 0]) > np.var(first[:, 1])
