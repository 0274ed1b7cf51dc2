"""Image classification data from TFDS array_record files, read without TensorFlow.

``digits`` (the default) is scikit-learn's bundled handwritten digits, written by the local TFDS
builder ``jaxes_digits`` (``jaxes.digits``) into ``data_dir`` on first use. Any other TFDS data set
with a uint8 ``image`` of fixed shape and a ``label`` ClassLabel, prepared as array_record, loads
by name.

TensorFlow is never imported. TFDS 4.9.10 writes ``tf.train.Example`` records with its own protobuf
copy; only some features call TF ops to encode (``Image`` from numpy calls ``tf.image.encode_png``),
and ``Image`` data sets decode with PIL, also without TF.

Public data sets (mnist, cifar10, ...) are downloaded once, which may need TensorFlow::

    pip install 'jaxes[prepare]' && python -m jaxes.data prepare mnist --data_dir=DIR
"""

from __future__ import annotations

import dataclasses
import os
import sys

import numpy as np
import tensorflow_datasets as tfds

from jaxes import cli
from jaxes import digits as digits_lib

DIGITS = "digits"
# Every data set's splits, by the names the digits builder writes.
SPLITS = digits_lib.SPLITS
# A data set without a validation split gives a fixed tenth of its train split to validation: the
# last tenth of a permutation by the legacy RandomState (a stream numpy keeps fixed) of this seed.
VALIDATION_FRACTION = 0.1
VALIDATION_SEED = 0
_READ_CHUNK = 4096  # records per batched read: amortizes the per-call cost, bounds memory


class DataError(ValueError):
    """The data set is unknown, unprepared, or not an image classification data set."""


def _prepare_hint(name: str, data_dir: str) -> str:
    return (
        f"prepare it once with `python -m jaxes.data prepare {name} --data_dir={data_dir}` "
        "(needs `pip install 'jaxes[prepare]'`: TensorFlow and network)"
    )


@dataclasses.dataclass(frozen=True)
class InputSpec:
    """What a model's input looks like: model input = float32(image) * scale."""

    height: int
    width: int
    channels: int
    num_classes: int
    dtype: str = "uint8"
    scale: float = 1.0 / 255.0

    def __post_init__(self):
        for field in ("height", "width", "channels", "num_classes"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"InputSpec.{field} must be a positive int, got {value!r}.")
        if self.dtype != "uint8":
            raise ValueError(f"InputSpec.dtype must be 'uint8', got {self.dtype!r}.")
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"InputSpec.scale must be finite and > 0, got {self.scale!r}.")

    @property
    def shape(self) -> tuple[int, int, int]:
        """The shape of one image, (height, width, channels)."""
        return (self.height, self.width, self.channels)

    def to_dict(self) -> dict:
        """Returns the spec as a JSON-serializable dict."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> InputSpec:
        """Rebuilds a spec from `to_dict` output (exact, also after a JSON round trip)."""
        if unknown := set(d) - {field.name for field in dataclasses.fields(cls)}:
            raise ValueError(f"InputSpec.from_dict got unknown keys {sorted(unknown)}.")
        return cls(**d)


def normalize(images, spec: InputSpec):
    """Maps stored images to model input.

    Args:
      images: uint8 array (numpy or jax) of shape (..., H, W, C).
      spec: the data set's input spec.

    Returns:
      float32 array of the same shape, float32(images) * spec.scale (in [0, 1] for uint8).
    """
    return images.astype(np.float32) * np.float32(spec.scale)


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
    """A data set: its input spec and its three splits."""

    name: str
    spec: InputSpec
    train: Split
    validation: Split
    test: Split

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
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise DataError(
            f"Unknown dataset {name!r}: use {DIGITS!r}, or a TFDS dataset name and "
            f"{_prepare_hint(name, data_dir)}."
        ) from error
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
    return InputSpec(height, width, channels, int(label.num_classes))


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


def load(name: str = DIGITS, data_dir: str | os.PathLike | None = None) -> Data:
    """Loads a data set's three splits into host memory.

    Args:
      name: 'digits' (prepared here on first use), or a TFDS name prepared as array_record.
      data_dir: the TFDS data directory; `default_data_dir()` when None.

    Returns:
      The data set, with its input spec.

    Raises:
      DataError: the data set is unknown, unprepared, or not image classification.
    """
    data_dir = os.fspath(data_dir) if data_dir is not None else default_data_dir()
    if name in (DIGITS, digits_lib.JaxesDigits.name):
        builder = digits_lib.prepare_digits(data_dir)
    else:
        builder = _prepared_builder(name, data_dir)
    spec = _input_spec(name, builder)
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
    return Data(name=name, spec=spec, **splits)


def main(argv: list[str] | None = None) -> int:
    """Prepares a data set: `python -m jaxes.data prepare NAME --data_dir=DIR`.

    Exit codes: 0 prepared; 2 misuse (unknown name, unwritable dir, not an image data set);
    1 the environment could not prepare a known data set (no TensorFlow or no network).
    """
    parser = cli.Parser(prog="python -m jaxes.data", description=main.__doc__.split("\n")[0])
    parser.add_argument("command", choices=("prepare",))
    parser.add_argument("name", help=f"{DIGITS!r} or a TFDS dataset name")
    parser.add_argument("--data_dir", default=default_data_dir(), help="default: %(default)s")
    args = parser.parse_args(argv)
    try:
        if args.name in (DIGITS, digits_lib.JaxesDigits.name):
            digits_lib.prepare_digits(args.data_dir)
        else:
            builder = tfds.builder(args.name, data_dir=args.data_dir, file_format="array_record")
            builder.download_and_prepare(file_format="array_record")
        data = load(args.name, args.data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        cli.fail(
            f"TFDS has no dataset {args.name!r}; use {DIGITS!r} or a name from the TFDS catalog."
        )
    except OSError as error:
        cli.fail(cli.describe_os_error(error))
    except DataError as error:  # prepared, but not an image classification data set
        cli.fail(str(error))
    except Exception as error:  # no TensorFlow, no network, a broken download
        print(
            f"jaxes: preparing {args.name!r} in {args.data_dir} failed "
            f"({type(error).__name__}: {str(error).partition(chr(10))[0]}); it needs "
            "`pip install 'jaxes[prepare]'` and network access.",
            file=sys.stderr,
        )
        return 1
    split_sizes = {key: len(data.split(key)) for key in SPLITS}
    print(f"Prepared {args.name!r} in {args.data_dir}: {data.spec}, split sizes {split_sizes}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
