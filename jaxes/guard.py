"""What ends a run from outside, turned into one sentence: a signal or a full disk.

``Guard`` wraps a run's round loop. SIGINT (Ctrl-C) and SIGTERM (a scheduler's stop) raise
``Interrupted`` at once, wherever the loop is: every file of a workdir is committed atomically
(see ``jaxes.checkpoint``), so stopping mid-round is as harmless as a SIGKILL, and rerunning the
same command resumes. A second signal while the first unwinds exits at once. An error that a
full disk caused, however Orbax or TensorStore wrapped it, becomes ``DiskFull``.
"""

from __future__ import annotations

import json
import os
import signal
import threading
from pathlib import Path
from types import FrameType

from jaxes.files import CHECKPOINTS, RESUME_STATE, is_disk_full

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The run was stopped by ``signum``; ``exit_code`` is the shell's 128 + signum."""

    def __init__(self, signum: int, round_index: int):
        self.signum, self.round_index = signum, round_index
        self.exit_code = 128 + signum
        super().__init__(f"interrupted in round {round_index}; run the same command to resume.")


class DiskFull(OSError):
    """The disk of the workdir filled up; every committed round is intact."""

    def __init__(self, workdir: str, round_index: int):
        super().__init__(
            f"no space left on the device of {workdir} while saving round {round_index}; free "
            "space and run the same command to resume."
        )
        self.workdir, self.round_index = workdir, round_index

    def __str__(self) -> str:
        return self.args[0]


class Guard:
    """Turns SIGINT/SIGTERM into ``Interrupted`` and a full disk into ``DiskFull``.

    Set ``round_index`` as the loop advances: a full disk names it; an interruption names the
    first round that is not committed (what a rerun starts with). Signal handlers are only
    installed from the main thread (Python allows no other); elsewhere signals are left alone.
    """

    def __init__(self, workdir: str | os.PathLike, round_index: int = 0):
        self.workdir = os.fspath(workdir)
        self.round_index = round_index
        self._previous: dict[int, object] = {}
        self._fired = False

    def _next_round(self) -> int:
        """The first round not committed: what a rerun starts with (read from the disk, so it
        is exact even when the signal lands inside a commit)."""
        path = Path(self.workdir) / CHECKPOINTS / RESUME_STATE
        try:
            return int(json.loads(path.read_text())["next_round"])
        except (OSError, ValueError, KeyError, TypeError):
            return self.round_index

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self._fired:  # a second Ctrl-C while the first unwinds: leave now
            os._exit(128 + signum)
        self._fired = True
        raise Interrupted(signum, self._next_round())

    def __enter__(self) -> Guard:
        if threading.current_thread() is threading.main_thread():
            for signum in SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, kind, error, traceback) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
        ours = isinstance(error, Interrupted | DiskFull)
        if error is not None and not ours and is_disk_full(error):
            raise DiskFull(self.workdir, self.round_index) from error
