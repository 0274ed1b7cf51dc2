"""The best instance as a deployable unit: parameters + everything needed to rebuild it.

Saved by the rounds loop through ``checkpoint.Checkpointer``; loaded by ``embed``, ``export``
and the end of a run. Loading needs only the workdir: ``Meta`` (the checkpoint's metadata)
holds the ``Arch``, input spec and log-rate, so the model is rebuilt without the run's config.
``Meta`` is the one definition of that record: it is written here and read through it by
``rounds``, ``embed``, ``export`` and ``report``.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import jax
from flax import nnx

from jaxes import backbones, checkpoint, data, files, models


@dataclasses.dataclass(frozen=True)
class Meta:
    """What a saved instance is: its round, architecture, hyper-parameters, input and score.

    Attributes:
      round_index: the round that trained it (0-based).
      arch: the ``models.Arch`` as a dict.
      input_spec: the ``data.InputSpec`` as a dict (image shape, scale, classes).
      log_rate: the dropout log-rate; the drop probability is ``exp(log_rate)`` (claim 2).
      metrics: its validation metrics (``val_accuracy``, ``val_loss``, ...).
      metric: the name of the monitored metric.
      dataset: the data set it was trained on.
      hparams: the training hyper-parameters of its round (learning rate, weight decay, batch
        size, ...); empty for instances saved before they were recorded.
      class_names: the data set's class names in label order, if it has them.
      backbone_source: for a registered backbone (``jaxes.backbones``), the file that registers
        it, imported again by ``abstract_model`` when a process loads the instance without it.
    """

    round_index: int
    arch: dict
    input_spec: dict
    log_rate: float
    metrics: dict
    metric: str
    dataset: str
    hparams: dict = dataclasses.field(default_factory=dict)
    class_names: list | None = None  # label i is class_names[i]; None when the data has none
    backbone_source: str | None = None

    @property
    def dropout_rate(self) -> float:
        return math.exp(self.log_rate)

    @property
    def value(self) -> float | None:
        """The monitored metric's value."""
        return self.metrics.get(self.metric)

    @property
    def spec(self) -> data.InputSpec:
        return data.InputSpec.from_dict(self.input_spec)

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe dict (with ``dropout_rate`` for readers that do not import jaxes)."""
        return {**dataclasses.asdict(self), "dropout_rate": self.dropout_rate}

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Meta:
        """The inverse of ``to_json``; derived and unknown keys are ignored."""
        names = {field.name for field in dataclasses.fields(cls)}
        return cls(**{key: value for key, value in record.items() if key in names})


def save(ckpt: checkpoint.Checkpointer, state: nnx.State, meta: Meta) -> None:
    """Saves an instance's state (params + log-rate) with its metadata."""
    name = meta.arch.get("backbone")
    if backbones.is_registered(name):
        meta = dataclasses.replace(meta, backbone_source=backbones.get(name).source)
    ckpt.save_best(meta.round_index, nnx.to_pure_dict(state), meta.to_json())


def abstract_model(meta: Meta) -> models.Model:
    """An unallocated model of the recorded arch and input spec."""
    backbones.ensure(meta.arch.get("backbone"), meta.backbone_source)
    spec, arch = meta.spec, models.Arch.from_dict(meta.arch)
    return nnx.eval_shape(
        lambda: models.build(arch, spec.shape, spec.num_classes, jax.random.key(0), meta.log_rate)
    )


def load(
    workdir: str | os.PathLike,
    round_index: int | None = None,
    sharding: jax.sharding.Sharding | None = None,
) -> tuple[models.Model, Meta]:
    """Restores the best instance of a run onto the devices present now.

    Args:
      workdir: the run directory.
      round_index: the best round to restore (default: the newest saved).
      sharding: where its parameters go (e.g. ``sharding.replicated(mesh)``, what the jitted
        evaluation and embedding take, so they never reshard it); default: the first local
        device.

    Returns:
      (model, meta): the model with its trained parameters, and its ``Meta``.

    Raises:
      checkpoint.CheckpointError: the workdir has no finished best instance.
    """
    directory = Path(workdir) / files.CHECKPOINTS
    if not directory.is_dir():
        raise checkpoint.CheckpointError(
            f"{workdir} has no finished best instance (no {directory}); run "
            f"`.venv/bin/python -m jaxes.main --config=... --workdir={workdir}` to completion "
            "first."
        )
    with checkpoint.Checkpointer(directory, is_primary=False) as ckpt:
        pure, record = ckpt.restore_best(round_index=round_index, sharding=sharding)
    meta = Meta.from_json(record)
    graphdef, state = nnx.split(abstract_model(meta))
    nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, pure))
    return nnx.merge(graphdef, state), meta
