"""Runs an export of ``python -m jaxes.export`` with jax, orbax-checkpoint and numpy alone.

(``jax.export`` reads the file with the ``flatbuffers`` package, which jax does not install.)

This file imports nothing from jaxes and no Flax, so it can be copied next to the exported
directory onto a machine that has neither::

    import numpy as np
    from jaxes import serving          # or: import serving, with this file copied alone

    embedder = serving.load("exported/digits")
    vectors = embedder(images)         # uint8 (N, H, W, C) -> float32 (N, D)

Images must already be converted to ``embedder.input_shape`` (see ``manifest.json``,
``preprocessing``); scaling to float happens inside the exported function.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp

MODEL_FILE = "model.jaxexport"
MANIFEST_FILE = "manifest.json"
FORMAT = "jaxes-export-1"
_LEAF = re.compile(r"^(\w+)\[([\d,]*)\]$")


class ServingError(ValueError):
    """The export directory or the images given to it are not usable."""


def _abstract_params(layout, sharding):
    """ShapeDtypeStructs from the manifest's ``dtype[d0,d1]`` leaves."""
    if isinstance(layout, dict):
        return {key: _abstract_params(value, sharding) for key, value in layout.items()}
    match = _LEAF.match(layout)
    if match is None:
        raise ServingError(f"the manifest's params tree has a malformed leaf {layout!r}.")
    shape = tuple(int(size) for size in match.group(2).split(",") if size)
    return jax.ShapeDtypeStruct(shape, np.dtype(match.group(1)), sharding=sharding)


class Embedder:
    """A loaded export: call it on uint8 images (N, H, W, C) to get float32 (N, D).

    Batches are cut into chunks of at most ``max_batch`` rows and each chunk is padded to a power
    of two, so at most ``log2(max_batch) + 1`` programs are ever compiled, whatever N is.

    Attributes:
      manifest: the export's manifest.json.
      input_shape: (H, W, C) of one image.
      embedding_size: D.
    """

    def __init__(self, exported, params, manifest: dict, max_batch: int = 256):
        if max_batch < 1:
            raise ServingError(f"max_batch must be >= 1, got {max_batch}.")
        self.manifest = manifest
        self.input_shape = tuple(manifest["input"]["shape"][1:])
        self.embedding_size = int(manifest["embedding_size"])
        self.max_batch = max_batch
        self._params = params
        self._call = jax.jit(exported.call)

    def __call__(self, images) -> np.ndarray:
        """Embeds uint8 images (N, H, W, C); returns float32 (N, D)."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or images.shape[1:] != self.input_shape or images.ndim != 4:
            raise ServingError(
                f"images must be uint8 of shape (N, {', '.join(map(str, self.input_shape))}), "
                f"got {images.dtype} {images.shape}; convert them as manifest.json's "
                "'preprocessing' says."
            )
        out = [np.empty((0, self.embedding_size), np.float32)]
        for start in range(0, len(images), self.max_batch):
            chunk = images[start : start + self.max_batch]
            padded = min(1 << (len(chunk) - 1).bit_length(), self.max_batch)
            if padded > len(chunk):
                filler = np.zeros((padded - len(chunk), *self.input_shape), np.uint8)
                chunk_in = np.concatenate([chunk, filler])
            else:
                chunk_in = chunk
            out.append(np.asarray(self._call(self._params, chunk_in))[: len(chunk)])
        return np.concatenate(out).astype(np.float32, copy=False)


def load(directory: str | os.PathLike, max_batch: int = 256) -> Embedder:
    """Loads an export directory onto this process's first local device.

    Args:
      directory: what ``python -m jaxes.export --out`` wrote.
      max_batch: largest batch compiled (see ``Embedder``).

    Returns:
      The embedder.

    Raises:
      ServingError: the directory is not a jaxes export (or of an unknown format).
    """
    directory = Path(directory).expanduser().absolute()
    try:
        manifest = json.loads((directory / MANIFEST_FILE).read_text())
        blob = (directory / MODEL_FILE).read_bytes()
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError) as error:
        raise ServingError(
            f"{directory} is not an export of `python -m jaxes.export` ({error})."
        ) from error
    if manifest.get("format") != FORMAT:
        raise ServingError(
            f"{directory} holds export format {manifest.get('format')!r}; this loader reads "
            f"{FORMAT!r}."
        )
    exported = jax.export.deserialize(bytearray(blob))
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = _abstract_params(manifest["params"]["tree"], sharding)
    with ocp.StandardCheckpointer() as checkpointer:
        params = checkpointer.restore(directory / manifest["params"]["path"], target)
    return Embedder(exported, params, manifest, max_batch)
