"""The names of a run's files, and the one writer of files that must appear whole or not at all.

Standard library only, so every layer (checkpoints, plots, the workdir, embed) may import it.

    WORKDIR/config.json          the full config; a workdir belongs to exactly one config
    WORKDIR/data.json            the data set's identity (an image folder's fingerprint)
    WORKDIR/rounds.jsonl         one JSON line per finished round
    WORKDIR/summary.json         the result, written last: its presence means "finished"
    WORKDIR/rounds.png           the rounds plot
    WORKDIR/tensorboard/         TensorBoard scalars
    WORKDIR/checkpoints/         the best instance (Orbax) and resume_state.json
    WORKDIR/.lock                the writer's lock (its PID inside), see ``workdir.lock``
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path

CONFIG = "config.json"
DATA = "data.json"  # the data set's identity: name, folder, fingerprint, class names
ROUNDS = "rounds.jsonl"
SUMMARY = "summary.json"
PLOT = "rounds.png"
NEIGHBORS = "neighbors.png"  # the kNN figure of the best instance (jaxes.vis)
EMBEDDING = "embedding.png"  # its 2-D embedding map (jaxes.vis)
TENSORBOARD = "tensorboard"
CHECKPOINTS = "checkpoints"
RESUME_STATE = "resume_state.json"
LOCK = ".lock"


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replaces the file at ``path`` with ``data`` so that readers see old or new, never a mix.

    The file gets the permissions of any new file (``0o666`` minus the umask), unlike
    ``tempfile.mkstemp``'s ``0o600``, so a workdir shared by several users or hosts stays
    readable. An ``OSError`` names ``path``, never the temporary file beside it.

    Args:
      path: The file to write; its directory must exist.
      data: The new content.
    """
    atomic_write_files((path, data))


def atomic_write_files(*files: tuple[str | os.PathLike, bytes]) -> None:
    """``atomic_write_bytes`` of several ``(path, data)`` files, replaced in the order given.

    Every file is written and flushed beside its target before the first one is replaced, so a
    full disk or another write error replaces none of them; a kill between two replacements
    leaves the earlier ones new. (``embed`` writes a row record, then the array it describes.)
    """
    staged, current = [], None
    try:
        for path, data in files:
            current = Path(path)
            tmp = current.with_name(f".{current.name}.{secrets.token_hex(4)}.tmp")
            staged.append((tmp, current))
            _write_flushed(tmp, data)
        for tmp, current in staged:
            os.replace(tmp, current)
            # The rename itself is durable only once the directory entry is flushed.
            dir_fd = os.open(current.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except OSError as error:  # named by the user's file, never by its temporary
        raise OSError(error.errno, error.strerror or str(error), os.fspath(current)) from error
    finally:
        for tmp, _ in staged:
            tmp.unlink(missing_ok=True)


def _write_flushed(tmp: Path, data: bytes) -> None:
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``atomic_write_bytes`` of ``text`` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def is_tmp(name: str) -> bool:
    """Whether ``name`` is a temporary file of ``atomic_write_bytes`` (left by a kill)."""
    return name.startswith(".") and name.endswith(".tmp")


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` or anything that caused it is a full disk (or exceeded quota).

    Orbax and TensorStore wrap the OS error in their own exceptions, sometimes only in the text.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error)
        if "No space left on device" in text or "Disk quota exceeded" in text:
            return True
        error = error.__cause__ or error.__context__
    return False
