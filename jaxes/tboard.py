"""TensorBoard scalars for a rounds run, written by tensorboardX: no TensorFlow, no JAX.

tensorboardX is imported only when an enabled writer is opened, so a non-primary process (or any
code that never writes scalars) never pays for it.
"""

from __future__ import annotations

import numbers
import os
from collections.abc import Mapping
from typing import Any

_ROUND_TAGS = {  # record key -> TensorBoard tag
    "metric": "round/metric",
    "best": "round/best",
    "streak": "round/streak",
    "patience": "round/patience",
    "rounds_budget": "round/rounds_budget",
    "val_loss": "round/val_loss",
    "val_accuracy": "round/val_accuracy",
    "train_loss": "round/train_loss",
    "dropout_rate": "round/dropout_rate",
    "epochs": "round/epochs",
    "wall_seconds": "round/wall_seconds",
}


class ScalarWriter:
    """TensorBoard scalars through tensorboardX (no TensorFlow); a no-op when disabled.

    Use it as a context manager. Only the primary process should pass ``enabled=True``.
    """

    def __init__(
        self, logdir: str | os.PathLike, *, enabled: bool = True, purge_step: int | None = None
    ):
        """Opens the writer.

        Args:
          logdir: the directory for the event files.
          enabled: False makes every method a no-op and creates no file (non-primary processes).
          purge_step: on resume, the first step to be written again; TensorBoard hides events of
            earlier runs at or after it.
        """
        self._writer = None
        if enabled:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(os.fspath(logdir), purge_step=purge_step)

    def write_round(self, record: Mapping[str, Any]) -> None:
        """Writes one round record's scalars at ``step = record["round_index"]``, skipping None.

        Args:
          record: a round record, as appended to ``rounds.jsonl``.
        """
        scalars = {tag: record.get(key) for key, tag in _ROUND_TAGS.items()}
        self.write_scalars(record["round_index"], scalars)
        if self._writer is not None:
            self._writer.flush()  # rounds are rare and runs get killed: keep each on disk.

    def write_scalars(self, step: int, scalars: Mapping[str, float | None]) -> None:
        """Writes scalars at one step; None values are skipped.

        Args:
          step: the global step (for rounds, the round index).
          scalars: tag -> real number or None.
        """
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise TypeError(f"step must be an int, got {step!r}; pass the round or epoch index.")
        for tag, value in scalars.items():
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise TypeError(f"scalar {tag!r} must be a real number or None, got {value!r}.")
            if self._writer is not None:
                self._writer.add_scalar(tag, float(value), int(step))

    def flush(self) -> None:
        """Flushes pending events to disk."""
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        """Flushes and closes the event file; safe to call twice."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def __enter__(self) -> ScalarWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
