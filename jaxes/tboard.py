"""TensorBoard output of a rounds run, written by tensorboardX: no TensorFlow, no JAX.

* ``ScalarWriter``: the run's scalars per round (``round/metric``, ``round/best``, ...).
* ``Sessions``: every round is also an HParams *session* (a run directory
  ``rounds/round_NNNNN`` holding its architecture fields and hyper-parameters as the hparams
  plugin's ``SessionStartInfo``, its metrics as scalars and its status as ``SessionEndInfo``), so
  TensorBoard's HParams dashboard shows the table of rounds and the parallel-coordinates view.
  No experiment summary is written: the plugin then builds one from the sessions it finds, so
  fields that only some rounds have (a searched field, a conditional one) still appear.

tensorboardX is imported only when an enabled writer is opened, so a non-primary process (or any
code that never writes scalars) never pays for it.
"""

from __future__ import annotations

import json
import numbers
import os
import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
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


# The run directory of the sessions, under the TensorBoard logdir, and each round's name in it.
SESSIONS = "rounds"
_TEMPORARY = ".partial"  # a session being written; renamed when complete
# Round record key -> the session's metric tag (read by the plugin as the last scalar value).
SESSION_METRICS = {
    "metric": "hparams/metric",
    "val_accuracy": "hparams/val_accuracy",
    "val_loss": "hparams/val_loss",
    "train_loss": "hparams/train_loss",
    "epochs": "hparams/epochs",
    "wall_seconds": "hparams/wall_seconds",
}
# Round record keys that are hyper-parameters of the round, besides its architecture fields.
SESSION_HPARAMS = ("learning_rate", "weight_decay", "dropout_rate", "generation", "round_index")


def session_name(round_index: int) -> str:
    """The session (TensorBoard run) name of a round, relative to the logdir."""
    return f"{SESSIONS}/round_{round_index:05d}"


def session_hparams(record: Mapping[str, Any]) -> dict[str, str | bool | float]:
    """The hyper-parameters of a round's session: its choice's fields, then ``SESSION_HPARAMS``.

    None values (a field that does not apply) are left out; numbers become floats (the plugin's
    only number type); anything that is not a string, bool or number becomes its JSON text.
    """
    values = {**dict(record.get("arch") or {}), **{k: record.get(k) for k in SESSION_HPARAMS}}
    out: dict[str, str | bool | float] = {}
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool | str):
            out[name] = value
        elif isinstance(value, numbers.Real):
            out[name] = float(value)
        else:
            out[name] = json.dumps(value, sort_keys=True)
    return out


def _plugin_summary(tag: str, **data):
    from tensorboardX.proto import plugin_hparams_pb2, summary_pb2

    content = plugin_hparams_pb2.HParamsPluginData(version=0, **data).SerializeToString()
    metadata = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="hparams", content=content)
    )
    return summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, metadata=metadata)])


class Sessions:
    """Writes one TensorBoard HParams session per round; a no-op when disabled.

    A session is written into a temporary directory and renamed when complete, so a session
    directory is always whole. ``sync`` makes the sessions on disk exactly the committed rounds:
    a resumed run first drops the sessions of rounds past the commit (a kill may have left them)
    and writes any committed round's missing session, so sessions are never duplicated or lost.
    """

    def __init__(self, logdir: str | os.PathLike, *, enabled: bool = True):
        self.root = Path(logdir) / SESSIONS
        self.enabled = enabled

    def _path(self, round_index: int) -> Path:
        return self.root.parent / session_name(round_index)

    def on_disk(self) -> list[int]:
        """The round indices whose (complete) sessions are on disk, ascending."""
        if not self.root.is_dir():
            return []
        names = (p.name for p in self.root.iterdir() if p.is_dir() and p.suffix != _TEMPORARY)
        return sorted(int(n.removeprefix("round_")) for n in names if n.startswith("round_"))

    def sync(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Makes the sessions on disk exactly those of ``records`` (the committed rounds).

        Args:
          records: the committed round records, as ``rounds.jsonl`` holds them.
        """
        if not self.enabled:
            return
        records = {int(r["round_index"]): r for r in records}
        if self.root.is_dir():
            for path in self.root.iterdir():
                name = path.name.removesuffix(_TEMPORARY).removeprefix("round_")
                if path.suffix == _TEMPORARY or not name.isdigit() or int(name) not in records:
                    if path.is_dir():
                        shutil.rmtree(path)
                    else:
                        path.unlink()
        for round_index in sorted(set(records) - set(self.on_disk())):
            self.write(records[round_index])

    def write(self, record: Mapping[str, Any]) -> None:
        """Writes the session of one round record (replacing any earlier one of that round).

        Args:
          record: a round record, as appended to ``rounds.jsonl``.
        """
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter
        from tensorboardX.proto import api_pb2, plugin_hparams_pb2

        round_index = int(record["round_index"])
        final = self._path(round_index)
        partial = final.with_name(final.name + _TEMPORARY)
        shutil.rmtree(partial, ignore_errors=True)
        now = time.time()
        start = plugin_hparams_pb2.SessionStartInfo(start_time_secs=now)
        for name, value in session_hparams(record).items():
            if isinstance(value, bool):
                start.hparams[name].bool_value = value
            elif isinstance(value, str):
                start.hparams[name].string_value = value
            else:
                start.hparams[name].number_value = value
        failed = record.get("status") == "failed"
        status = api_pb2.Status.Value("STATUS_FAILURE" if failed else "STATUS_SUCCESS")
        end = plugin_hparams_pb2.SessionEndInfo(status=status, end_time_secs=now)
        writer = SummaryWriter(os.fspath(partial))
        try:
            writer.file_writer.add_summary(
                _plugin_summary("_hparams_/session_start_info", session_start_info=start),
                round_index,
            )
            for key, tag in SESSION_METRICS.items():
                value = record.get(key)
                if isinstance(value, numbers.Real) and not isinstance(value, bool):
                    writer.add_scalar(tag, float(value), round_index)
            writer.file_writer.add_summary(
                _plugin_summary("_hparams_/session_end_info", session_end_info=end), round_index
            )
        finally:
            writer.close()
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
