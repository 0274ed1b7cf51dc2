"""What a model's input looks like: ``InputSpec`` (shape, classes, scale) and ``normalize``.

Imported by ``jaxes.data``, which re-exports both; it needs only numpy, so serving-side code can
use it too.
"""

from __future__ import annotations

import dataclasses

import numpy as np


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
