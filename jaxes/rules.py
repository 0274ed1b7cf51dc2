"""Rules that several layers check, each defined once. Standard library only.

* ``METRICS`` and ``mode_for``: the direction in which each monitored metric improves.
* ``check_batch_size``: a batch must fit the training split and split evenly over the devices.

A broken rule raises ``FieldError``, which carries the config field it is about, so the caller
never has to parse a message to learn which field was wrong.
"""

from __future__ import annotations

METRICS = {"val_accuracy": "max", "val_loss": "min"}


class FieldError(ValueError):
    """A value breaks a rule; ``field`` is its config path (e.g. ``train.batch_size``)."""

    def __init__(self, field: str, problem: str):
        super().__init__(f"config.{field}: {problem}")
        self.field = field
        self.problem = problem


def mode_for(metric: str) -> str:
    """``"max"`` or ``"min"``: how ``metric`` improves.

    Raises:
      FieldError: ``metric`` is not a known metric.
    """
    if metric not in METRICS:
        raise FieldError("metric", f"must be one of {sorted(METRICS)}, got {metric!r}.")
    return METRICS[metric]


def check_batch_size(
    batch_size: int, examples: int, devices: int, field: str = "train.batch_size", data: str = ""
) -> None:
    """Raises FieldError unless ``batch_size`` fits ``examples`` and splits over ``devices``.

    Args:
      batch_size: the global batch size.
      examples: the number of training examples.
      devices: the number of devices the batch is sharded over.
      field: the config field the batch size came from, named in the error.
      data: the data set's name, for the message.
    """
    if batch_size > examples:
        raise FieldError(
            field,
            f"must be at most the {examples} training examples{f' of {data}' if data else ''}, "
            f"got {batch_size}.",
        )
    if batch_size % devices:
        fix = max(1, batch_size // devices) * devices
        raise FieldError(
            field,
            f"must be a multiple of the {devices} devices, got {batch_size}; use e.g. {fix}.",
        )
