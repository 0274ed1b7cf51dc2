"""The files of a run's workdir, other than checkpoints.

    WORKDIR/config.json     the full config; a workdir belongs to exactly one config
    WORKDIR/rounds.jsonl    one JSON line per finished round
    WORKDIR/summary.json    the result, written at the end
    WORKDIR/rounds.png, WORKDIR/tensorboard/, WORKDIR/checkpoints/

Only the primary process writes (the caller checks ``jax.process_index() == 0``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from jaxes.checkpoint import atomic_write_text

CONFIG = "config.json"
DATA = "data.json"  # the data set's identity: name, folder, fingerprint, class names
ROUNDS = "rounds.jsonl"
SUMMARY = "summary.json"


class WorkdirError(ValueError):
    """The workdir cannot be used with this config."""


def config_json(config) -> str:
    """The canonical JSON of a config (ml_collections ConfigDict or dict)."""
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.dumps(as_dict, sort_keys=True, indent=2, default=list)


def claim(workdir: str | os.PathLike, config, *, write: bool) -> None:
    """Makes ``workdir`` this config's, or checks that it already is.

    Args:
      workdir: the run directory.
      config: the run config.
      write: whether this process writes (the primary one).

    Raises:
      WorkdirError: the workdir holds another config's run; nothing in it is touched.
    """
    path = Path(workdir) / CONFIG
    text = config_json(config)
    if path.exists():
        if json.loads(path.read_text()) != json.loads(text):
            raise WorkdirError(
                f"{workdir} holds a run of a different config ({path}); use a new --workdir, "
                "or rerun with that run's exact config to resume it."
            )
        return
    if write:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text + "\n")


def claim_data(workdir: str | os.PathLike, identity: dict, *, write: bool) -> None:
    """Records the data a run trains on, or checks that a resumed run sees the same data.

    Raises:
      WorkdirError: the workdir's run was made on other data (a changed image folder).
    """
    path = Path(workdir) / DATA
    if path.exists():
        recorded = json.loads(path.read_text())
        # The folder's place may change (a moved disk); its contents may not.
        if {k: v for k, v in recorded.items() if k != "source"} != {
            k: v for k, v in identity.items() if k != "source"
        }:
            source = recorded.get("source") or recorded.get("dataset")
            raise WorkdirError(
                f"the data of {workdir} changed since its run began ({source}: fingerprint "
                f"{recorded.get('fingerprint')}, now {identity.get('fingerprint')}); "
                "restore the data to resume, or use a new --workdir."
            )
    elif write:
        atomic_write_text(path, json.dumps(identity, indent=2, sort_keys=True) + "\n")


def read_config(workdir) -> dict:
    """The run's config.json as a dict (dataset, data_dir, ...)."""
    path = Path(workdir) / CONFIG
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise WorkdirError(
            f"{workdir} has no {CONFIG}, so its run is unknown; point --workdir at a run made "
            "by `python -m jaxes.main`."
        ) from None
    except json.JSONDecodeError as error:
        raise WorkdirError(f"{path} is not valid JSON ({error}); the workdir is damaged.") from None


def read_rounds(workdir) -> list[dict]:
    """The round records written so far (a torn last line, from a kill, is dropped)."""
    path = Path(workdir) / ROUNDS
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return records


def write_rounds(workdir, records: list[dict]) -> None:
    """Rewrites rounds.jsonl atomically with exactly ``records``."""
    atomic_write_text(Path(workdir) / ROUNDS, "".join(_line(r) for r in records))


def append_round(workdir, record: dict) -> None:
    """Appends one record line and flushes it to disk."""
    with open(Path(workdir) / ROUNDS, "a", encoding="utf-8") as f:
        f.write(_line(record))
        f.flush()
        os.fsync(f.fileno())


def _line(record: dict) -> str:
    return json.dumps(record, sort_keys=True, allow_nan=False) + "\n"


def write_summary(workdir, summary: dict) -> None:
    atomic_write_text(Path(workdir) / SUMMARY, json.dumps(summary, indent=2, sort_keys=True) + "\n")


def read_summary(workdir) -> dict | None:
    path = Path(workdir) / SUMMARY
    return json.loads(path.read_text()) if path.exists() else None
