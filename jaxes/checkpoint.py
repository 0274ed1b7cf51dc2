"""The best instance (Orbax) and the resume state (atomic JSON) of a rounds run.

Layout of ``WORKDIR/checkpoints``::

    <round_index>/              one Orbax step per best instance
      params/                   the parameter pytree (StandardSave, OCDBT)
      meta/                     caller's JSON: arch, input spec, metrics, log_rate, ...
      tree/                     JSON of the pytree's containers and key types
    resume_state.json           the committed resume state

Commit protocol (what makes a SIGKILL at any moment harmless):

1. ``save_best(k, ...)`` writes step ``k`` through Orbax, which finalizes it by renaming
   ``k.orbax-checkpoint-tmp`` to ``k``; the previous best stays on disk.
2. ``save_state(state)`` replaces ``resume_state.json`` atomically. This is the commit point of
   round ``k``. Only after it is durable are the bests older than ``k`` deleted.
3. On resume the caller calls ``discard_after(last committed round)``, which removes a best left
   by a run killed between steps 1 and 2. The committed best is still there, because step 2
   never ran; with Orbax's own ``max_to_keep=1`` it would already be gone.

The resume state is plain JSON rather than an Orbax item so that one ``os.replace`` is the
commit: it is tiny, must be written by the primary process alone, and must be readable without
JAX. Steps are deleted by renaming them to an Orbax temporary name first, then removing them:
Orbax's own deleter removes a step in place, and a kill mid-removal would leave a half-deleted
directory that still looks finalized. Temporary directories left by a kill are removed when the
next writer starts.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import sys
import threading
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import multihost

from jaxes import pytree
from jaxes.files import RESUME_STATE, atomic_write_text, is_disk_full

_STATE_FILE = RESUME_STATE
# Orbax's marker for an unfinalized step directory (atomicity_types.TMP_DIR_SUFFIX).
_TMP_MARKER = ".orbax-checkpoint-tmp"


class CheckpointError(ValueError):
    """A checkpoint that the caller needs is missing or unreadable."""


# The hooks that _held_thread_reports swaps are the process's: saves that hold them take turns.
_HOLDING = threading.Lock()
# Where Orbax's threads log (absl.logging) and where asyncio logs a task's unretrieved exception.
_LOGGERS = ("absl", "asyncio")


@contextlib.contextmanager
def _held_thread_reports():
    """Holds what Orbax's worker threads report while a save runs, and drops it if the save
    fails because the disk is full.

    On a full disk every one of Orbax's writer threads logs its own error with a traceback
    (absl; asyncio for a task whose exception nobody retrieved), and TensorStore's callbacks
    raise into the event loops Orbax has closed by then (printed through ``sys.excepthook``,
    ``sys.unraisablehook`` or ``threading.excepthook``); the run then reports the full disk in
    one sentence (``guard.DiskFull``), and the reports of it that come later are dropped too
    (``_drop_full_disk_reports``). Any other failure, or a save that succeeds, gets every held
    report back: the logs, then the hook calls, each in order. The hooks are the process's, so
    saves that hold them take turns (a lock).
    """
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    logs, calls = [], []

    def hold_log(record):
        logs.append(record)
        return False

    def holder(name):
        return lambda *args: calls.append((name, args))

    with _HOLDING:
        hooks = {
            "sys.excepthook": (sys, "excepthook"),
            "sys.unraisablehook": (sys, "unraisablehook"),
            "threading.excepthook": (threading, "excepthook"),
        }
        saved = {name: getattr(owner, attr) for name, (owner, attr) in hooks.items()}
        for logger in loggers:
            logger.addFilter(hold_log)
        for name, (owner, attr) in hooks.items():
            setattr(owner, attr, holder(name))
        full = False
        try:
            yield
        except BaseException as error:
            full = is_disk_full(error)
            raise
        finally:
            # On a full disk the hooks go straight from holding to dropping its late reports.
            if not (full and _drop_full_disk_reports(saved)):
                for name, (owner, attr) in hooks.items():
                    setattr(owner, attr, saved[name])
            for logger in loggers:
                logger.removeFilter(hold_log)
            if not full:
                for record in logs:
                    logging.getLogger(record.name).handle(record)
                for name, args in calls:
                    saved[name](*args)


def _about_the_full_disk(error) -> bool:
    """Whether ``error`` reports the full disk, or a callback raising into a loop closed by it."""
    closed_loop = isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
    return error is not None and (closed_loop or is_disk_full(error))


def _record_about_the_full_disk(record: logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    return _about_the_full_disk(error) or is_disk_full(RuntimeError(record.getMessage()))


def _drop_full_disk_reports(hooks: dict) -> bool:
    """From now on, drops the reports of the full disk that a save already failed on; returns
    False if that is already so. ``hooks`` are the process's own hooks, by dotted name.

    After ``_held_thread_reports`` gave the hooks back, Orbax's and asyncio's last reports of
    that failure can still arrive: TensorStore callbacks firing into closed event loops, and a
    task's unretrieved exception logged when it is collected. They say nothing the run's one
    sentence does not. Every other report goes on as before.
    """
    global _DROPPING
    if _DROPPING:
        return False
    _DROPPING = True
    for name in _LOGGERS:
        logging.getLogger(name).addFilter(lambda r: not _record_about_the_full_disk(r))
    unraisable, excepthook = hooks["sys.unraisablehook"], hooks["sys.excepthook"]
    thread_hook = hooks["threading.excepthook"]
    sys.unraisablehook = lambda a: None if _about_the_full_disk(a.exc_value) else unraisable(a)
    sys.excepthook = lambda t, v, tb: None if _about_the_full_disk(v) else excepthook(t, v, tb)
    threading.excepthook = lambda a: None if _about_the_full_disk(a.exc_value) else thread_hook(a)
    return True


_DROPPING = False


class Checkpointer:
    """Keeps the best instance and the resume state of one run.

    In a multi-process run ``save_best``, ``discard_after`` and ``restore_best`` are
    collective (every process calls them; Orbax places barriers inside). ``best_round`` and
    ``load_state`` may be called by any process alone. ``save_state`` writes on the primary
    process only and is a no-op elsewhere. Nothing is created on disk until the first write,
    so reading a mistyped workdir leaves no trace.
    """

    def __init__(self, directory: str | os.PathLike, *, is_primary: bool | None = None):
        """Opens ``directory`` (``WORKDIR/checkpoints``) without touching it.

        Args:
          directory: The checkpoint directory; created by the first write.
          is_primary: Whether this process writes the resume state and deletes old steps.
            Defaults to ``jax.process_index() == 0``.
        """
        self.directory = Path(directory).absolute()
        self.is_primary = jax.process_index() == 0 if is_primary is None else is_primary
        self._writer: ocp.CheckpointManager | None = None
        self._reader: ocp.CheckpointManager | None = None
        self._pending_round: int | None = None
        self._barrier_count = 0

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Closes the Orbax managers; the object may be used again afterwards."""
        for manager in (self._writer, self._reader):
            if manager is not None:
                manager.close()
        self._writer = self._reader = None

    def _manager(self, *, write: bool) -> ocp.CheckpointManager:
        if self._writer is None and write:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
            if self.is_primary:
                self.directory.mkdir(parents=True, exist_ok=True)
                self._remove_leftovers()
            self._barrier("open")
            self._writer = self._new_manager(create=True)
        if self._writer is not None:
            self._writer.reload()  # another process may have committed or pruned since
            return self._writer
        if self._reader is None:
            self._reader = self._new_manager(create=False)
        self._reader.reload()
        return self._reader

    def _new_manager(self, *, create: bool) -> ocp.CheckpointManager:
        options = ocp.CheckpointManagerOptions(
            create=create,
            enable_async_checkpointing=False,  # no thread may outlive a save
            cleanup_tmp_directories=False,  # done synchronously in _remove_leftovers
            save_root_metadata=False,
        )
        # Handlers are named up front so that a manager that never saved can read metadata.
        handlers = {
            "params": ocp.StandardCheckpointHandler(),
            "meta": ocp.JsonCheckpointHandler(),
            "tree": ocp.JsonCheckpointHandler(),
        }
        return ocp.CheckpointManager(self.directory, item_handlers=handlers, options=options)

    def _barrier(self, name: str) -> None:
        # Orbax barrier names must be unique; every process counts the same calls.
        self._barrier_count += 1
        multihost.sync_global_processes(f"jaxes_checkpoint_{name}_{self._barrier_count}")

    def _remove_leftovers(self) -> None:
        """Removes unfinalized Orbax steps and state tmp files left by a killed process."""
        for entry in self.directory.iterdir():
            if _TMP_MARKER in entry.name:
                shutil.rmtree(entry, ignore_errors=True)
            elif entry.name.startswith(f".{_STATE_FILE}.") and entry.name.endswith(".tmp"):
                entry.unlink(missing_ok=True)

    def _steps_on_disk(self) -> list[int]:
        if not self.directory.is_dir():
            return []
        return sorted(self._manager(write=False).all_steps())

    def _delete_steps(self, steps: list[int]) -> None:
        """Deletes steps on the primary process; a kill midway leaves only Orbax tmp dirs."""
        if not self.is_primary:
            return
        for step in steps:
            doomed = self.directory / f"{step}{_TMP_MARKER}-deleted"
            shutil.rmtree(doomed, ignore_errors=True)
            os.replace(self.directory / str(step), doomed)
            shutil.rmtree(doomed)

    def save_best(self, round_index: int, params: Any, meta: dict) -> None:
        """Saves the new best instance as step ``round_index``; collective.

        Steps at or after ``round_index`` are leftovers of an uncommitted run and are replaced.
        Older bests are deleted by the next ``save_state``, once this round is committed.

        Args:
          round_index: The round that produced the instance (>= 0).
          params: Nested dicts, lists and tuples of arrays, or an ``nnx.State`` (saved as
            ``nnx.to_pure_dict`` of it).
          meta: JSON-serializable description (arch, input spec, metrics, ...).
        """
        if not isinstance(round_index, int) or isinstance(round_index, bool) or round_index < 0:
            raise ValueError(f"round_index must be an int >= 0, got {round_index!r}.")
        if type(params).__module__.startswith("flax."):
            from flax import nnx  # only reached when the caller already uses Flax

            params = nnx.to_pure_dict(params)
        structure = pytree.structure(params)
        try:
            json.dumps(meta)
        except (TypeError, ValueError) as error:
            raise ValueError(f"meta must be JSON-serializable: {error}.") from error
        self.discard_after(round_index - 1)
        manager = self._manager(write=True)
        with _held_thread_reports():
            saved = manager.save(
                round_index,
                args=ocp.args.Composite(
                    params=ocp.args.StandardSave(params),
                    meta=ocp.args.JsonSave(meta),
                    tree=ocp.args.JsonSave(structure),
                ),
                force=True,
            )
            manager.wait_until_finished()
        if not saved:
            raise RuntimeError(f"Orbax declined to save step {round_index} in {self.directory}.")
        self._pending_round = round_index

    def best_round(self) -> int | None:
        """Returns the newest finalized best step, or None when there is none."""
        steps = self._steps_on_disk()
        return steps[-1] if steps else None

    def discard_after(self, round_index: int) -> None:
        """Deletes every best step after ``round_index``; collective.

        Args:
          round_index: The last committed round; -1 deletes every best.
        """
        manager = self._manager(write=True)
        if self.is_primary:
            self._delete_steps([step for step in manager.all_steps() if step > round_index])
        self._barrier("discard")
        if self._pending_round is not None and self._pending_round > round_index:
            self._pending_round = None

    def keep_only(self, round_index: int | None) -> None:
        """Deletes every best step except ``round_index`` (all of them if None); collective.

        A resumed run calls it with its committed best round: this removes a best saved by a
        round that was never committed, and an older best whose deletion a kill interrupted.

        Args:
          round_index: The committed best round, or None when no round has a best.
        """
        manager = self._manager(write=True)
        if self.is_primary:
            self._delete_steps([step for step in manager.all_steps() if step != round_index])
        self._barrier("keep_only")
        self._pending_round = None

    def restore_best(
        self,
        *,
        abstract_params: Any = None,
        round_index: int | None = None,
        sharding: jax.sharding.Sharding | None = None,
    ) -> tuple[Any, dict]:
        """Restores a best instance onto the devices present now.

        Args:
          abstract_params: A pytree of ``jax.ShapeDtypeStruct`` with ``.sharding`` to restore
            onto. If None, the saved pytree (same containers and key types) is restored with
            every leaf on ``sharding``, whatever devices it was saved from.
          round_index: The step to restore; defaults to the newest.
          sharding: Where every leaf goes when ``abstract_params`` is None (e.g. replicated over
            a run's mesh, so the programs that use it never reshard it); default: this
            process's first local device.

        Returns:
          ``(params, meta)``.

        Raises:
          CheckpointError: if there is no finished best instance (or none at ``round_index``).
        """
        steps = self._steps_on_disk()
        if not steps:
            raise CheckpointError(
                f"no finished best instance in {self.directory}: run `.venv/bin/python -m "
                "jaxes.main --config=... --workdir=...` until it saves one first."
            )
        step = steps[-1] if round_index is None else round_index
        if step not in steps:
            raise CheckpointError(
                f"no best instance for round {round_index} in {self.directory}; "
                f"the saved rounds are {steps}."
            )
        manager = self._manager(write=False)
        if abstract_params is None:
            header = manager.restore(step, args=ocp.args.Composite(tree=ocp.args.JsonRestore()))
            metadata = manager.item_metadata(step)["params"]
            metadata = getattr(metadata, "tree", metadata)
            if sharding is None:
                sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
            abstract_params = pytree.rebuild(
                header["tree"],
                metadata,
                lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
            )
        else:
            for leaf in jax.tree.leaves(abstract_params):
                if getattr(leaf, "sharding", None) is None:
                    raise ValueError(
                        "every leaf of abstract_params needs a .sharding; build them with "
                        "jax.ShapeDtypeStruct(shape, dtype, sharding=...), or pass None."
                    )
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(abstract_params), meta=ocp.args.JsonRestore()
            ),
        )
        return restored["params"], restored["meta"]

    def save_state(self, state: dict) -> None:
        """Commits a round: atomically replaces the resume state, then drops superseded bests.

        Only the primary process writes; on the others this is a no-op.

        Args:
          state: JSON-serializable resume state (NaN and infinities are allowed).
        """
        try:
            text = json.dumps(state, sort_keys=True)
        except (TypeError, ValueError) as error:
            raise ValueError(f"state must be JSON-serializable: {error}.") from error
        pending, self._pending_round = self._pending_round, None
        if not self.is_primary:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.directory / _STATE_FILE, text)
        if pending is not None:
            self._delete_steps([step for step in self._steps_on_disk() if step < pending])

    def load_state(self) -> dict | None:
        """Returns the committed resume state, or None if no round was committed yet."""
        path = self.directory / _STATE_FILE
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        try:
            state = json.loads(text)
        except json.JSONDecodeError as error:
            raise CheckpointError(
                f"{path} is not valid JSON ({error}); delete the workdir and run again."
            ) from error
        if not isinstance(state, dict):
            raise CheckpointError(f"{path} holds no JSON object; delete the workdir and run again.")
        return state
