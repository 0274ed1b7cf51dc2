"""The best instance as a deployable unit: parameters + everything needed to rebuild it.

Saved by the rounds loop through ``checkpoint.Checkpointer``; loaded by ``embed``, ``export``
and the end of a run. Loading needs only the workdir: the ``Arch``, input spec and log-rate are
in the checkpoint's metadata, so the model is rebuilt without the run's config.
"""

from __future__ import annotations

import os
from pathlib import Path

import jax
from flax import nnx

from jaxes import checkpoint, data, models


def save(ckpt: checkpoint.Checkpointer, round_index: int, state: nnx.State, meta: dict) -> None:
    """Saves an instance's state (params + log-rate) with its metadata (arch, spec, ...)."""
    ckpt.save_best(round_index, nnx.to_pure_dict(state), meta)


def abstract_model(meta: dict) -> models.Model:
    """An unallocated model of the recorded arch and input spec."""
    spec = data.InputSpec.from_dict(meta["input_spec"])
    arch = models.Arch.from_dict(meta["arch"])
    return nnx.eval_shape(
        lambda: models.build(
            arch, spec.shape, spec.num_classes, jax.random.key(0), meta["log_rate"]
        )
    )


def load(workdir: str | os.PathLike, round_index: int | None = None) -> tuple[models.Model, dict]:
    """Restores the best instance of a run onto the devices present now.

    Args:
      workdir: the run directory.
      round_index: the best round to restore (default: the newest saved).

    Returns:
      (model, meta): the model with its trained parameters; ``meta`` holds ``arch``,
      ``input_spec``, ``log_rate``, ``metrics``, ``round_index``, ``metric`` and ``dataset``.

    Raises:
      checkpoint.CheckpointError: the workdir has no finished best instance.
    """
    directory = Path(workdir) / "checkpoints"
    if not directory.is_dir():
        raise checkpoint.CheckpointError(
            f"{workdir} has no finished best instance (no {directory}); run "
            f"`python -m jaxes.main --config=... --workdir={workdir}` to completion first."
        )
    with checkpoint.Checkpointer(directory, is_primary=False) as ckpt:
        pure, meta = ckpt.restore_best(round_index=round_index)
    model = abstract_model(meta)
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, jax.tree.map(jax.numpy.asarray, pure))
    return nnx.merge(graphdef, state), meta
