"""The files of a run's workdir, other than checkpoints (``jaxes.files`` names them all).

Only the primary process writes (the caller checks ``jax.process_index() == 0``), and only one
run writes a workdir at a time: ``lock`` holds an OS lock on ``WORKDIR/.lock`` for as long as
the run lives. The kernel drops it when the holder dies, so a SIGKILLed run never blocks its
own resume.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from jaxes.files import CONFIG, DATA, LOCK, ROUNDS, SUMMARY, atomic_write_text


class WorkdirError(ValueError):
    """The workdir cannot be used with this config."""


def config_json(config) -> str:
    """The canonical JSON of a config (ml_collections ConfigDict or dict)."""
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return json.dumps(as_dict, sort_keys=True, indent=2, default=list)


def _flat(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat = {}
    for key, value in tree.items():
        flat.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


# Config fields added after runs were saved, with the value that reproduces those runs: a
# config.json without one holds that value (so an old run resumes with it, and only with it).
ADDED_FIELDS = {"parallel.pad_depth_backbones": []}  # 2026-12-02: depth buckets


def _added_field_nodes(config: dict):
    """``(parent dict, leaf name, old value)`` of each ``ADDED_FIELDS`` entry in ``config``."""
    for name, value in ADDED_FIELDS.items():
        *parents, leaf = name.split(".")
        node = config
        for key in parents:
            node = node.setdefault(key, {})
        yield node, leaf, value


def with_added_fields(saved: dict) -> dict:
    """``saved`` (a config.json dict) with every ``ADDED_FIELDS`` entry it lacks filled in."""
    saved = json.loads(json.dumps(saved))
    for node, leaf, value in _added_field_nodes(saved):
        node.setdefault(leaf, value)
    return saved


def without_added_fields(config: dict) -> dict:
    """``config`` (a config dict) without the ``ADDED_FIELDS`` entries that hold their old
    value: what a config.json of a run that behaves the same looked like before they existed."""
    config = json.loads(json.dumps(config))
    for node, leaf, value in _added_field_nodes(config):
        if node.get(leaf, value) == value:
            node.pop(leaf, None)
    return config


def first_difference(ours: dict, theirs: dict) -> tuple[str, object, object] | None:
    """The first field (in sorted dotted order) where two config dicts differ, with both values.

    A field that one config lacks has the value ``"<absent>"`` there.
    """
    a, b = _flat(ours), _flat(theirs)
    for name in sorted(set(a) | set(b)):
        left, right = a.get(name, "<absent>"), b.get(name, "<absent>")
        if left != right:
            return name, left, right
    return None


def check(workdir: str | os.PathLike, config) -> bool:
    """Checks, reading only, that ``workdir`` can hold this config's run.

    Returns:
      Whether the workdir already holds this config's run (its config.json matches).

    Raises:
      WorkdirError: the workdir is a file, or holds another config's run.
    """
    workdir = Path(workdir)
    if workdir.exists() and not workdir.is_dir():
        raise WorkdirError(f"{workdir} is a file, not a directory; use a new --workdir.")
    path = workdir / CONFIG
    if not path.exists():
        return False
    ours = json.loads(config_json(config))
    theirs = with_added_fields(read_config(workdir))
    difference = first_difference(ours, theirs)
    if difference is not None:
        name, mine, saved = difference
        raise WorkdirError(
            f"{workdir} holds a run of a different config: config.{name} is {mine!r} now but "
            f"{saved!r} in {path}; use a new --workdir, or rerun with that run's config to "
            "resume it."
        )
    return True


def claim(workdir: str | os.PathLike, config, *, write: bool) -> None:
    """Makes ``workdir`` this config's, or checks that it already is.

    Args:
      workdir: the run directory.
      config: the run config.
      write: whether this process writes (the primary one).

    Raises:
      WorkdirError: the workdir is a file or holds another config's run; nothing is touched.
    """
    if check(workdir, config) or not write:
        return
    Path(workdir).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(workdir) / CONFIG, config_json(config) + "\n")


@contextlib.contextmanager
def lock(workdir: str | os.PathLike, *, wait_seconds: float = 0.5) -> Iterator[None]:
    """Holds the workdir's writer lock (creating the workdir) for the ``with`` body.

    Args:
      workdir: the run directory.
      wait_seconds: how long to retry a held lock (a ``jaxes.report`` peeks at it briefly).

    Raises:
      WorkdirError: another live process holds the lock; it is named by PID and host.
    """
    Path(workdir).mkdir(parents=True, exist_ok=True)
    path = Path(workdir) / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        deadline = time.monotonic() + wait_seconds
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
                    raise WorkdirError(
                        f"{workdir} is in use by another run (process {holder}); wait for it "
                        "to end or stop it, or use a new --workdir."
                    ) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays, holding the last writer's PID


def is_locked(workdir: str | os.PathLike) -> bool:
    """Whether a live process holds the workdir's writer lock (reads only; no file is made)."""
    try:
        fd = os.open(Path(workdir) / LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


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
            "by `.venv/bin/python -m jaxes.main`."
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
    path = Path(workdir) / ROUNDS
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(_line(record))
            f.flush()
            os.fsync(f.fileno())
    except OSError as error:
        raise OSError(error.errno, error.strerror or str(error), os.fspath(path)) from error


def _line(record: dict) -> str:
    return json.dumps(record, sort_keys=True, allow_nan=False) + "\n"


def write_summary(workdir, summary: dict) -> None:
    """Writes summary.json, the last file of a run: its presence means the run finished."""
    atomic_write_text(Path(workdir) / SUMMARY, json.dumps(summary, indent=2, sort_keys=True) + "\n")


def read_summary(workdir) -> dict | None:
    path = Path(workdir) / SUMMARY
    return json.loads(path.read_text()) if path.exists() else None
