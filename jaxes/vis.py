"""Pictures that show a person how good the features are (claim 7): neighbours and a 2-D map.

- ``neighbors.png``: rows of test images, each followed by its nearest train images by embedding
  (cosine, ``infer.nearest``), framed green when of the test image's class and red otherwise.
- ``embedding.png``: the test embeddings in 2-D, coloured by class: PCA (linear, exact) beside
  t-SNE (scikit-learn, ``init="pca"``, fixed ``random_state``; up to ``TSNE_MAX`` points, an even
  subsample beyond), which shows the neighbourhoods that kNN uses.

Both are written at the end of a run (``rounds._finish``) and by ``python -m jaxes.embed ...
--plots``. matplotlib draws through the Agg canvas (no pyplot), as ``jaxes.plot`` does.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from jaxes import files, infer
from jaxes.plot import _save_atomically

TSNE_MAX = 2000


def pick_queries(labels, count: int) -> np.ndarray:
    """``count`` test rows, deterministic: round-robin over classes (first of each class first)."""
    labels = np.asarray(labels)
    per_class = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    picked, depth = [], 0
    while len(picked) < min(count, len(labels)):
        for rows in per_class:
            if depth < len(rows) and len(picked) < count:
                picked.append(int(rows[depth]))
        depth += 1
    return np.array(picked, np.int64)


def _show(ax, image: np.ndarray) -> None:
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255, interpolation="nearest")
    else:
        ax.imshow(image, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _frame(ax, colour: str) -> None:
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(3)


def plot_neighbors(
    path, query_images, query_labels, train_images, train_labels, query_emb, train_emb,
    class_names=(), *, rows: int = 10, k: int = 8,
) -> None:  # fmt: skip
    """Draws ``neighbors.png``.

    Args:
      path: the PNG file.
      query_images: uint8 (N, H, W, C) test images; query_emb their (N, D) embeddings.
      query_labels: their labels, or None for files of unknown class (no frames then).
      train_images, train_labels, train_emb: the gallery the neighbours come from.
      class_names: label names, for the titles.
      rows: test images shown; k: neighbours per test image.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if query_labels is None:
        chosen = np.unique(np.linspace(0, len(query_images) - 1, min(rows, len(query_images))))
        chosen = chosen.astype(np.int64)
    else:
        chosen = pick_queries(query_labels, rows)
    k = min(k, len(train_images))
    nearest = infer.nearest(train_emb, np.asarray(query_emb)[chosen], k)
    train_labels = np.asarray(train_labels)

    def name(label) -> str:
        return class_names[label] if len(class_names) > label else str(label)

    fig = Figure(figsize=(1.1 * (k + 1) + 0.4, 1.2 * len(chosen) + 0.8), dpi=100)
    FigureCanvasAgg(fig)
    grid = fig.subplots(len(chosen), k + 1, squeeze=False)
    hits = 0
    for row, (query, neighbours) in enumerate(zip(chosen, nearest, strict=True)):
        _show(grid[row, 0], query_images[query])
        truth = None if query_labels is None else int(query_labels[query])
        grid[row, 0].set_title("?" if truth is None else name(truth), fontsize=8, weight="bold")
        _frame(grid[row, 0], "black")
        for col, index in enumerate(neighbours, start=1):
            ax = grid[row, col]
            _show(ax, train_images[index])
            label = int(train_labels[index])
            ax.set_title(name(label), fontsize=7)
            if truth is not None:
                _frame(ax, "tab:green" if label == truth else "tab:red")
                hits += label == truth
    marked = "" if query_labels is None else (
        f": green = same class as the test image, red = another ({hits}/{len(chosen) * k} green)"
    )  # fmt: skip
    fig.suptitle(f"test image (left), then its {k} nearest train images by embedding{marked}",
                 fontsize=9)  # fmt: skip
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=1 - 0.55 / fig.get_figheight(),
                        wspace=0.15, hspace=0.45)  # fmt: skip
    _save_atomically(fig, os.fspath(path))


def project(embeddings, method: str) -> np.ndarray:
    """2-D coordinates of (N, D) embeddings by ``"pca"`` or ``"tsne"`` (deterministic)."""
    x = np.asarray(embeddings, np.float64)
    if method == "pca":
        centered = x - x.mean(axis=0)
        _, _, vt = np.linalg.svd(centered, full_matrices=False)
        coords = centered @ vt[:2].T
        # The SVD's sign is arbitrary: make each axis's largest coordinate positive.
        signs = np.sign(coords[np.abs(coords).argmax(axis=0), [0, 1]])
        return coords * np.where(signs == 0, 1, signs)
    if method == "tsne":
        from sklearn.manifold import TSNE
        from threadpoolctl import threadpool_limits

        perplexity = float(min(30, max(2, (len(x) - 1) // 3)))
        tsne = TSNE(2, init="pca", random_state=0, perplexity=perplexity, max_iter=500)
        # One OpenMP thread: for the <= TSNE_MAX points drawn here, more threads spin-wait on a
        # busy machine (measured on 2 cores beside other work: 15.7 s of CPU against 1.4 s).
        with threadpool_limits(limits=1, user_api="openmp"):
            return tsne.fit_transform(x)
    raise ValueError(f"method must be 'pca' or 'tsne', got {method!r}.")


def plot_embedding(path, embeddings, labels, class_names=(), *, title: str = "") -> None:
    """Draws ``embedding.png``: PCA and t-SNE of the embeddings, coloured by ``labels``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    embeddings, labels = np.asarray(embeddings), np.asarray(labels)
    if len(embeddings) > TSNE_MAX:  # an even subsample keeps t-SNE to seconds
        keep = np.linspace(0, len(embeddings) - 1, TSNE_MAX).astype(np.int64)
        embeddings, labels = embeddings[keep], labels[keep]
    fig = Figure(figsize=(12, 5.6), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    classes = np.unique(labels)
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(classes) <= 10 else "tab20"]
    axes = fig.subplots(1, 2)
    size = float(np.clip(4000 / max(1, len(embeddings)), 6, 36))  # few points drawn larger
    methods = ("pca", "tsne") if len(embeddings) >= 5 else ("pca",)
    for ax, method in zip(axes, methods, strict=False):
        coords = project(embeddings, method)
        for number, label in enumerate(classes):
            members = labels == label
            name = class_names[label] if len(class_names) > label else str(label)
            ax.scatter(*coords[members].T, s=size, alpha=0.75, color=cmap(number % cmap.N),
                       label=name, linewidths=0)  # fmt: skip
        ax.set_title("PCA" if method == "pca" else "t-SNE (scikit-learn, perplexity <= 30)")
        ax.set_xticks([])
        ax.set_yticks([])
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside right upper", fontsize="small", markerscale=2,
               ncol=1 if len(classes) <= 16 else 2)  # fmt: skip
    fig.suptitle(title or f"{len(embeddings)} test embeddings in 2-D, coloured by class")
    _save_atomically(fig, os.fspath(path))


def write_plots(directory, data, train_emb, test_emb, *, title: str = "") -> list[Path]:
    """Writes ``neighbors.png`` and ``embedding.png`` of a data set's test split into
    ``directory``; returns their paths."""
    directory = Path(directory)
    paths = [directory / files.NEIGHBORS, directory / files.EMBEDDING]
    names = tuple(data.class_names)
    plot_neighbors(paths[0], data.test.images, data.test.labels, data.train.images,
                   data.train.labels, test_emb, train_emb, names)  # fmt: skip
    plot_embedding(paths[1], test_emb, data.test.labels, names, title=title)
    return paths
