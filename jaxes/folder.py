"""A folder of labelled images as a TFDS data set, prepared once without TensorFlow.

Layouts (those of torchvision ``ImageFolder``, Keras ``image_dataset_from_directory`` and TFDS
``ImageFolder``)::

    ROOT/CLASS/**/IMAGE                                   split here, stratified 80/10/10
    ROOT/train/CLASS/**/IMAGE, ROOT/test/CLASS/**/IMAGE   used as given; ROOT/validation/ too,
                                                          else jaxes.data carves it from train

Class names are the class folders' names in sorted order (label i is the i-th name). Files whose
suffix is not an image suffix (``images.IMAGE_SUFFIXES``) and hidden files are ignored. Every image
is converted with ``jaxes.images.to_spec``, exactly as ``jaxes.embed`` converts files, so training
and serving see the same pixels. A file that is not a readable image fails the preparation with
one sentence naming every such file (nothing is written): fix or remove them and run again.

The **fingerprint** hashes the class names and the sorted relative paths with each file's size
and mtime. With the conversion (size, channels) it names the prepared TFDS config
(``jaxes_folder/<folder>-HxWxC-<fingerprint>``), so a changed folder is prepared anew and never
read as the old one. The split of a folder without split folders orders each class's files by the
SHA-256 of their relative paths, so it is fixed by the file list alone, with no seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import statistics
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds

from jaxes import digits as digits_lib
from jaxes import images as images_lib

SPLIT_DIRS = ("train", "validation", "test")
HOLDOUT_FRACTION = 0.1  # of each class, to validation and to test each, when split here
MAX_AUTO_SIDE = 64  # an automatic size keeps the median aspect, its longer side at most this
AUTO_SAMPLE = 512  # image headers read to pick an automatic size and channel count
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N"})
_LISTED = 5  # bad files named in an error sentence, then a count


class FolderError(ValueError):
    """The folder cannot be a data set (one sentence naming the problem and the fix)."""


@dataclasses.dataclass(frozen=True)
class Options:
    """How a folder's images are converted: 0 picks a value from the folder (``resolve``)."""

    path: str
    height: int = 0
    width: int = 0
    channels: int = 0  # 1 (gray) or 3 (RGB); 0: 1 if every sampled image is gray, else 3


@dataclasses.dataclass(frozen=True)
class Listing:
    """The images of a folder: ``files[i] = (relative path, label, split or "")``."""

    root: Path
    class_names: tuple[str, ...]
    files: tuple[tuple[str, int, str], ...]
    fingerprint: str


def _image_files(directory: Path) -> list[Path]:
    found = []
    for parent, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [
            Path(parent, name)
            for name in filenames
            if not name.startswith(".") and Path(name).suffix.lower() in images_lib.IMAGE_SUFFIXES
        ]
    return sorted(found)


def _class_dirs(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.is_dir() and not p.name.startswith("."))


def scan(path: str | os.PathLike) -> Listing:
    """Lists a folder's images and labels and fingerprints them (stat only, nothing decoded).

    Raises:
      FolderError: a missing path, no class folders, a class without images, a single class.
    """
    root = Path(path).expanduser()
    if not root.is_dir():
        what = "does not exist" if not root.exists() else "is not a directory"
        raise FolderError(
            f"config.data.path={path} {what}; give a folder with one subfolder per class."
        )
    root = root.resolve()
    split_layout = (root / "train").is_dir()
    splits = [s for s in SPLIT_DIRS if (root / s).is_dir()] if split_layout else [""]
    if split_layout and "test" not in splits:
        raise FolderError(
            f"{root} has train/ but no test/; add test/ with the same class folders, or put the "
            "class folders directly in the folder to have it split 80/10/10."
        )
    per_split = {s: {d.name: d for d in _class_dirs(root / s)} for s in splits}
    class_names = tuple(sorted(per_split[splits[0]]))
    if not class_names:
        where = root / splits[0]
        raise FolderError(
            f"{where} has no class folders; put each class's images in a subfolder named after it."
        )
    if len(class_names) < 2:
        raise FolderError(
            f"{root} has a single class folder ({class_names[0]}); classification needs at "
            "least two."
        )
    files, stats = [], []
    for split in splits:
        if extra := sorted(set(per_split[split]) - set(class_names)):
            raise FolderError(
                f"{root / split} has class folders {extra} that train/ lacks; every class must "
                "have training images."
            )
        for label, name in enumerate(class_names):
            found = _image_files(per_split[split][name]) if name in per_split[split] else []
            if not found and split in ("", "train"):
                raise FolderError(
                    f"class folder {root / split / name} has no image files "
                    f"({', '.join(sorted(images_lib.IMAGE_SUFFIXES))}); add images or remove it."
                )
            for file in found:
                relative = file.relative_to(root).as_posix()
                status = file.stat()
                files.append((relative, label, split))
                stats.append((relative, status.st_size, status.st_mtime_ns))
    digest = hashlib.sha256(json.dumps([class_names, stats]).encode()).hexdigest()
    return Listing(root, class_names, tuple(files), digest[:16])


def split_files(listing: Listing) -> dict[str, list[int]]:
    """Indices into ``listing.files`` per split: as given, or stratified 80/10/10 here.

    Within a class, files are ordered by the SHA-256 of their relative path; the first tenth
    (rounded half up) goes to test, the next to validation, the rest (at least one) to train.
    Each split's indices are sorted, so records keep the sorted file order.
    """
    parts = {s: [] for s in SPLIT_DIRS}
    if any(split for _, _, split in listing.files):
        for index, (_, _, split) in enumerate(listing.files):
            parts[split].append(index)
        return parts
    for label in range(len(listing.class_names)):
        members = [i for i, f in enumerate(listing.files) if f[1] == label]
        members.sort(key=lambda i: hashlib.sha256(listing.files[i][0].encode()).digest())
        held = min(int(HOLDOUT_FRACTION * len(members) + 0.5), (len(members) - 1) // 2)
        parts["test"] += members[:held]
        parts["validation"] += members[held : 2 * held]
        parts["train"] += members[2 * held :]
    return {s: sorted(indices) for s, indices in parts.items()}


def resolve(options: Options, listing: Listing) -> tuple[int, int, int]:
    """The (height, width, channels) images are converted to; zeros are picked from the folder.

    From the headers of up to ``AUTO_SAMPLE`` files (every n-th in sorted order): channels 1 if
    every one is gray, else 3; the median height and width, scaled down so that the longer side
    is at most ``MAX_AUTO_SIDE``.
    """
    height, width, channels = options.height, options.width, options.channels
    if channels not in (0, 1, 3):
        raise FolderError(f"config.data.channels must be 0 (auto), 1 or 3, got {channels}.")
    if height < 0 or width < 0:
        raise FolderError(f"config.data.height and width must be >= 0, got {height}, {width}.")
    if height and width and channels:
        return height, width, channels
    from PIL import Image

    step = max(1, len(listing.files) // AUTO_SAMPLE)
    sizes, gray = [], True
    for relative, _, _ in listing.files[::step]:
        try:
            with Image.open(listing.root / relative) as image:  # reads the header only
                sizes.append(image.size)
                gray = gray and image.mode in _GRAY_MODES
        except (OSError, SyntaxError, ValueError):
            continue  # a bad file is reported, with all others, when the folder is prepared
    if sizes:
        auto_w, auto_h = (statistics.median_low(s[i] for s in sizes) for i in (0, 1))
        shrink = min(1.0, MAX_AUTO_SIDE / max(auto_w, auto_h))
        auto_h, auto_w = (max(1, int(v * shrink + 0.5)) for v in (auto_h, auto_w))
    else:
        auto_h = auto_w = MAX_AUTO_SIDE // 2
    return height or auto_h, width or auto_w, channels or (1 if gray else 3)


def config_name(listing: Listing, shape: tuple[int, int, int]) -> str:
    """The TFDS config the folder is prepared as: its name, conversion and fingerprint."""
    slug = re.sub(r"[^A-Za-z0-9]+", "_", listing.root.name).strip("_")[:40] or "folder"
    return f"{slug}-{'x'.join(map(str, shape))}-{listing.fingerprint}"


class JaxesFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """An image folder as a TFDS data set: uint8 (H, W, C) Tensor images, ClassLabel names."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # nothing downloaded: no checksums file (see JaxesDigits.code_path)

    def __init__(self, *, listing: Listing, shape: tuple[int, int, int], **kwargs):
        self._listing, self._shape = listing, tuple(shape)
        config = tfds.core.BuilderConfig(
            name=config_name(listing, shape), description=f"images of {listing.root}"
        )
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        image = tfds.features.Tensor(
            shape=self._shape, dtype=np.uint8, encoding=tfds.features.Encoding.BYTES
        )
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"The image folder {self._listing.root}, converted by jaxes.images.",
            features=tfds.features.FeaturesDict(
                {
                    "image": image,
                    "label": tfds.features.ClassLabel(names=list(self._listing.class_names)),
                    "index": tfds.features.Scalar(dtype=np.int32, doc="Row of the sorted list."),
                }
            ),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # the files are local
        parts = {s: idx for s, idx in split_files(self._listing).items() if idx}
        progress = {"bad": [], "left": len(parts)}  # shared by the splits' generators
        return {s: self._generate_examples(idx, progress) for s, idx in parts.items()}

    def _generate_examples(self, indices, progress: dict):
        spec = _Spec(*self._shape)
        for index in indices:
            relative, label, _ = self._listing.files[index]
            try:
                image = images_lib.read(self._listing.root / relative, spec)
            except images_lib.ImageError as error:  # "PATH ... (Pillow's reason)."
                progress["bad"].append(f"{relative} ({str(error).rsplit(' (', 1)[-1][:-2]})")
                continue
            except images_lib.ChannelError:
                progress["bad"].append(f"{relative} (a colour mode with no mapping to L or RGB)")
                continue
            yield index, {"image": image, "label": label, "index": index}
        progress["left"] -= 1
        bad = progress["bad"]
        if bad and not progress["left"]:  # every split read, in whatever order: name them all
            shown = "; ".join(bad[:_LISTED]) + (
                f"; and {len(bad) - _LISTED} more" if bad[_LISTED:] else ""
            )
            raise FolderError(
                f"{len(bad)} files in {self._listing.root} are not readable images: {shown}; "
                "fix or remove them, then run again."
            )


@dataclasses.dataclass(frozen=True)
class _Spec:
    """What ``images.read`` needs of an input spec."""

    height: int
    width: int
    channels: int


def prepare(options: Options, data_dir: str) -> tuple[tfds.core.DatasetBuilder, Listing]:
    """Prepares the folder in ``data_dir`` unless this exact folder is there; returns its builder.

    Raises:
      FolderError: the folder is not a data set, or holds files that are not readable images.
    """
    listing = scan(options.path)
    shape = resolve(options, listing)
    if shape[2] not in images_lib.SUPPORTED_CHANNELS:
        raise FolderError(f"config.data.channels must be 1 or 3, got {shape[2]}.")
    builder = digits_lib.prepare_locked(
        lambda **kwargs: JaxesFolder(listing=listing, shape=shape, data_dir=data_dir, **kwargs),
        data_dir,
    )
    return builder, listing
