"""The ``digits`` data set: scikit-learn's bundled handwritten digits as a local TFDS builder.

``prepare_digits(data_dir)`` writes it as array_record on first use (``jaxes.data.load("digits")``
calls it); nothing is downloaded. TensorFlow is never imported: TFDS 4.9.10 writes
``tf.train.Example`` records with its own protobuf copy, but ``Image`` from numpy calls
``tf.image.encode_png``. The image is therefore a raw uint8 ``Tensor`` feature, which numpy encodes
and decodes and which reads about twice as fast as PNG.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core.utils import tqdm_utils

# The builder writes these splits; jaxes.data gives every data set the same three names.
SPLITS = ("train", "validation", "test")


def digits_split_indices(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Splits sample indices 60/20/20, stratified by label and deterministic.

    Within each class, a permutation by the legacy `RandomState(0)` (a stream numpy keeps fixed
    across versions) gives the first fifth to test, the next fifth to validation, the rest to
    train. Each split's indices are sorted, so its records keep the source order.

    Args:
      labels: int labels of all samples.

    Returns:
      Sorted index arrays for train, validation and test.
    """
    rng = np.random.RandomState(0)
    parts = {name: [] for name in SPLITS}
    for label in np.unique(labels):
        indices = rng.permutation(np.flatnonzero(labels == label))
        fifth = int(0.2 * len(indices) + 0.5)
        parts["test"].append(indices[:fifth])
        parts["validation"].append(indices[fifth : 2 * fifth])
        parts["train"].append(indices[2 * fifth :])
    return {name: np.sort(np.concatenate(chunks)) for name, chunks in parts.items()}


# Kept out of TFDS's global registry: importing jaxes changes no global state, and no second copy
# of this module (run as a script, say) can collide with an imported one. Prepared, it still loads
# by name: `tfds.data_source("jaxes_digits", data_dir=...)` reads its info from disk.
class JaxesDigits(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """scikit-learn's digits as a TFDS data set: uint8 (8, 8, 1) images, 10 classes."""

    VERSION = tfds.core.Version("1.0.0")
    # Nothing is downloaded, so there is no checksums file to find next to the code. Looking for
    # one makes TFDS 4.9.10 import `importlib_resources`, undeclared on Python >= 3.9
    # (tensorflow/datasets#11212).
    code_path = None

    def _info(self) -> tfds.core.DatasetInfo:
        image = tfds.features.Tensor(
            shape=(8, 8, 1), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES
        )
        return tfds.core.DatasetInfo(
            builder=self,
            description="scikit-learn's bundled UCI handwritten digits, 8x8, values 0..255.",
            features=tfds.features.FeaturesDict(
                {
                    "image": image,
                    "label": tfds.features.ClassLabel(num_classes=10),
                    "index": tfds.features.Scalar(dtype=np.int32, doc="Row in load_digits()."),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
            disable_shuffling=True,  # records in generation order, not TFDS's key-hash order
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the data ships with scikit-learn: nothing to download
        from sklearn.datasets import load_digits

        digits = load_digits()
        # Integer rounding of v * 255 / 16 (half up): the same bytes on every platform.
        images = ((digits.images.astype(np.int64) * 255 + 8) // 16).astype(np.uint8)
        labels = digits.target.astype(np.int64)
        return {
            name: self._generate_examples(images, labels, indices)
            for name, indices in digits_split_indices(labels).items()
        }

    def _generate_examples(self, images, labels, indices):
        for index in map(int, indices):
            example = {"image": images[index, :, :, None], "label": labels[index], "index": index}
            yield index, example


def prepare_locked(make_builder, data_dir: str) -> tfds.core.DatasetBuilder:
    """Prepares a local builder in ``data_dir`` unless it is there; returns its builder.

    TFDS writes into ``incomplete.XXXXXX_VERSION`` and renames it into place only when complete,
    so a killed preparation leaves nothing that ``is_prepared()`` takes for done; its leftovers
    are removed here, under the lock, before the next attempt. The lock also makes a second
    process wait, then reuse the first one's files (a second rename would fail).

    Args:
      make_builder: ``make_builder(**kwargs)`` returns the builder (``file_format`` may be given).
      data_dir: the TFDS data directory.
    """
    builder = make_builder()
    if builder.is_prepared():
        return builder
    os.makedirs(data_dir, exist_ok=True)
    with open(os.path.join(data_dir, f".{builder.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        builder = make_builder(file_format="array_record")
        if not builder.is_prepared():
            version_dir = Path(builder.data_dir)
            for stale in version_dir.parent.glob(f"incomplete.*_{version_dir.name}"):
                shutil.rmtree(stale, ignore_errors=True)  # a killed run's partial files
            # TFDS's progress bars on a terminal only: a log or a test sees just the outcome.
            active = tqdm_utils._active
            tqdm_utils.display_progress_bar(sys.stderr.isatty())
            try:
                builder.download_and_prepare(file_format="array_record")
            finally:
                tqdm_utils.display_progress_bar(active)
    return make_builder()  # reads its info from disk, as every later load does


def prepare_digits(data_dir: str) -> tfds.core.DatasetBuilder:
    """Writes the digits data set into `data_dir` unless it is there; returns its builder."""
    return prepare_locked(lambda **kwargs: JaxesDigits(data_dir=data_dir, **kwargs), data_dir)
