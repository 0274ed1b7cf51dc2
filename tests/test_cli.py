"""The rounds command line as a user meets it: every message true, one sentence, the right exit.

Most tests call the real entry point (``jaxes.main``'s flag parser and ``main``) in this process:
a subprocess would add only JAX's start-up. Signals, the writer lock and a killed holder need a
second process, so those tests start one.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import importlib
import io
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from absl import flags

from jaxes import checkpoint, files, guard, main, workdir

ROOT = Path(__file__).resolve().parents[1]
SMOKE = f"--config={ROOT / 'configs' / 'digits.py'}:smoke"


def _main_here(argv) -> int:
    """``python -m jaxes.main ARGV`` in this process; returns its exit code."""
    flags.FLAGS.unparse_flags()
    for name in [name for name in flags.FLAGS if name.startswith("config.")]:
        delattr(flags.FLAGS, name)  # the last parse's --config.FIELD override flags
    code, saved_argv = 0, sys.argv
    sys.argv = ["jaxes.main", *argv]  # ml_collections reads --config.FIELD overrides from here
    try:
        main.main(main.parse_flags(sys.argv))
    except SystemExit as exit_:
        code = exit_.code or 0
    finally:
        sys.argv = saved_argv
    return code


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """Runs ``python -m jaxes.main ARGV`` in this process; returns (exit code, stdout, stderr)."""
    code = _main_here(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def run_module(module: str, *args) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` (a jaxes command) through its ``main`` in this process."""
    argv, out, err = [str(a) for a in args], io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        if module == "jaxes.main":
            code = _main_here(argv)
        else:
            command = importlib.import_module("jaxes.prepare" if module == "jaxes.data" else module)
            try:
                code = command.main(argv)
            except SystemExit as exit_:
                code = exit_.code or 0
    return subprocess.CompletedProcess([module, *argv], code, out.getvalue(), err.getvalue())


def smoke(path, data_dir, *extra) -> list[str]:
    return [SMOKE, f"--workdir={path}", f"--config.data_dir={data_dir}", *extra]


def tree_state(path) -> dict:
    """Every file under ``path`` with its digest, mode and mtime: any write changes it."""
    return {
        str(p.relative_to(path)): (
            hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_mode,
            p.stat().st_mtime_ns,
        )
        for p in sorted(Path(path).rglob("*"))
        if p.is_file()
    }


def one_sentence(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("jaxes: ") and lines[0].endswith("."), lines[0]
    return lines[0]


def test_help_exits_0_and_lists_the_chosen_configs_fields(capsys):
    code, out, err = run_cli(capsys, SMOKE, "--help")
    assert code == 0, err
    # Smoke values from configs/digits.py's smoke variant, and defaults it leaves alone.
    expected = ["  rounds = 4", "  seed = 6", "  search.space.width = [16, 24, 32]"]
    expected += ["  train.learning_rate = 0.001", "  tolerance.r = None", "  --workdir: "]
    for line in expected:
        assert line in out.splitlines() or any(x.startswith(line) for x in out.splitlines()), line


def test_help_without_a_config_lists_the_default_configs_fields(capsys):
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    assert "  rounds = 12" in out.splitlines() and "  search.strategy = 'evolution'" in out


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "--config.search.space.activation=gelu",
            "jaxes: the config has no field config.search.space.activation; config.search.space "
            "has backbone, depth, embed_dim, width.",
        ),
        ("--config.roundz=3", "jaxes: the config has no field config.roundz; config has "),
        ("--config.seed.x=1", "jaxes: the config has no field config.seed.x; config.seed is a "),
    ],
)
def test_an_unknown_field_is_named_by_its_full_path_with_the_valid_ones(
    capsys, tmp_path, digits_data_dir, override, message
):
    code, _, err = run_cli(capsys, *smoke(tmp_path / "run", digits_data_dir, override))
    assert code == 2
    assert one_sentence(err).startswith(message)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "override, needle",
    [
        ("--config.tolerance.ratio=1.5", "config.tolerance.ratio: ratio must be"),
        ("--config.tolerance.patience=0", "config.tolerance.patience: patience must be"),
        ("--config.train.batch_size=0", "config.train.batch_size"),
        ("--config.search.strategy=genetic", "config.search.strategy"),
        ("--config.metric=val_f1", "config.metric: must be one of"),
        ("--config.seed=7", "config.seed is 7 now but 6 in "),
    ],
)
def test_bad_input_exits_2_with_one_sentence_and_touches_nothing(
    capsys, smoke_run, digits_data_dir, override, needle
):
    before = tree_state(smoke_run)
    code, _, err = run_cli(capsys, *smoke(smoke_run, digits_data_dir, override))
    assert code == 2
    assert needle in one_sentence(err)
    assert tree_state(smoke_run) == before


def test_a_batch_that_cannot_be_split_exits_2_before_the_workdir_exists(
    capsys, tmp_path, digits_data_dir
):
    path = tmp_path / "run"
    big = "--config.train.batch_size=100000"
    code, _, err = run_cli(capsys, *smoke(path, digits_data_dir, big))
    assert code == 2
    assert "config.train.batch_size: must be at most the " in one_sentence(err)
    assert not path.exists()


def test_a_workdir_that_is_a_file_says_so(capsys, tmp_path, digits_data_dir):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    code, _, err = run_cli(capsys, *smoke(path, digits_data_dir))
    assert code == 2
    assert one_sentence(err) == f"jaxes: {path} is a file, not a directory; use a new --workdir."
    assert path.read_text() == "mine"


def test_an_os_error_names_the_users_path(capsys, tmp_path, digits_data_dir):
    parent = tmp_path / "plain_file"
    parent.write_text("")
    code, _, err = run_cli(capsys, *smoke(parent / "run", digits_data_dir))
    assert code == 2
    line = one_sentence(err)
    assert f"{parent / 'run'}" in line and "Not a directory" in line


def test_the_atomic_writer_names_the_target_not_its_temporary(tmp_path):
    target = tmp_path / "missing" / "summary.json"
    with pytest.raises(OSError) as error:
        files.atomic_write_text(target, "{}")
    assert error.value.filename == str(target)


def test_two_files_written_together_replace_neither_when_the_second_fails(tmp_path):
    record, array = tmp_path / "emb.json", tmp_path / "emb.npy"
    record.write_text("old record")
    missing = tmp_path / "missing" / "emb.npy"  # its directory is missing: staging it fails
    with pytest.raises(OSError) as error:
        files.atomic_write_files((record, b"new record"), (missing, b"new array"))
    assert error.value.filename == str(missing)
    assert record.read_text() == "old record"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.json"]  # no temporary left
    files.atomic_write_files((record, b"new record"), (array, b"new array"))
    assert (record.read_bytes(), array.read_bytes()) == (b"new record", b"new array")


def test_a_finished_run_says_so_prints_its_summary_and_writes_nothing(
    capsys, smoke_run, tmp_path, digits_data_dir
):
    import shutil

    run = tmp_path / "archived"
    shutil.copytree(smoke_run, run)
    for p in [run, *run.rglob("*")]:  # read-only, as an archived or someone else's run
        p.chmod(p.stat().st_mode & ~0o222)
    before = tree_state(run)
    try:
        code, out, err = run_cli(capsys, *smoke(run, digits_data_dir))
        after = tree_state(run)
    finally:
        for p in [run, *run.rglob("*")]:
            p.chmod(p.stat().st_mode | 0o200)
    summary = workdir.read_summary(smoke_run)
    assert code == 0, err
    assert err.strip() == f"run already finished (stop: {summary['stop_reason']}); nothing to do"
    assert f"best round   {summary['best_round']} " in out and "stop reason  patience" in out
    assert after == before  # also as root, whom a read-only mode does not stop


def test_more_rounds_than_the_space_holds_warns_and_ends_search_exhausted(
    capsys, tmp_path, digits_data_dir
):
    # Width 32 alone: the smoke space's bucket (its largest width), so its programs are cached.
    narrow = ["--config.search.space.width=(32,)", "--config.tolerance.patience=3"]
    code, _, err = run_cli(capsys, *smoke(tmp_path, digits_data_dir, *narrow))
    assert code == 0, err
    assert err.splitlines()[0] == (
        "warning: config.rounds=4 exceeds the 2 architectures of the search space; the run "
        "stops (search_exhausted) after at most 2 rounds"
    )
    assert err.splitlines()[1] == "starting round 0 of 4, patience 3 (fixed patience)"
    summary = workdir.read_summary(tmp_path)
    assert summary["stop_reason"] == "search_exhausted" and summary["rounds_run"] == 2


def test_workdir_files_follow_the_umask(smoke_run):
    umask = os.umask(0)
    os.umask(umask)
    modes = {
        str(p.relative_to(smoke_run)): stat.S_IMODE(p.stat().st_mode)
        for p in smoke_run.rglob("*")
        if p.is_file()
    }
    assert len(modes) > 5
    wrong = {name: oct(mode) for name, mode in modes.items() if mode != 0o666 & ~umask}
    assert not wrong, f"umask {oct(umask)}: {wrong}"


# --- what needs a second process: signals and the writer lock --------------------------------


def _env() -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")


def _start(path, data_dir) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jaxes.main", *smoke(path, data_dir)]
    return subprocess.Popen(
        cmd, env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _wait_for(condition, proc, what: str) -> None:
    deadline = time.monotonic() + 300
    while not condition():
        assert proc.poll() is None, f"the run ended before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def _committed(path) -> int:
    try:
        return json.loads((Path(path) / "checkpoints" / files.RESUME_STATE).read_text())[
            "next_round"
        ]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_stops_the_run_with_one_line_and_it_resumes_exactly(
    capsys, smoke_run, tmp_path, digits_data_dir, assert_same_run, signum, code
):
    proc = _start(tmp_path, digits_data_dir)
    _wait_for(lambda: _committed(tmp_path) >= 1, proc, "round 0 was committed")
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    match = re.fullmatch(
        r"jaxes: interrupted in round (\d+); run the same command to resume\.", last
    )
    assert match and int(match[1]) == _committed(tmp_path) >= 1, last
    if signum == signal.SIGINT:  # one resume suffices to show the interrupted run is intact
        resumed, _, err = run_cli(capsys, *smoke(tmp_path, digits_data_dir))
        assert resumed == 0, err
        assert err.splitlines()[0].startswith(f"resuming at round {match[1]} of ")
        assert_same_run(smoke_run, tmp_path)


def test_one_writer_per_workdir_and_a_killed_holder_frees_it(capsys, tmp_path, digits_data_dir):
    holder = _start(tmp_path, digits_data_dir)
    try:
        _wait_for(lambda: workdir.is_locked(tmp_path), holder, "the run took its lock")
        code, _, err = run_cli(capsys, *smoke(tmp_path, digits_data_dir))
        assert code == 2
        assert one_sentence(err).startswith(
            f"jaxes: {tmp_path} is in use by another run (process {holder.pid} on "
        )
    finally:
        holder.kill()
        holder.communicate()
    assert not workdir.is_locked(tmp_path)
    with workdir.lock(tmp_path, wait_seconds=0):  # a SIGKILLed holder never blocks a resume
        assert workdir.is_locked(tmp_path)


# --- a full disk ------------------------------------------------------------------------------


@contextlib.contextmanager
def _small_disk(tmp_path, monkeypatch):
    """A workdir on a 150 KiB tmpfs as root (round 0 fits, round 1's second best does not),
    else ENOSPC raised where Orbax would raise it, wrapped as Orbax wraps it.

    Yields ``(workdir, grow)``; ``grow()`` frees space (remounts bigger or stops the simulation).
    """
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = False
    if os.geteuid() == 0:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=150k", "tmpfs", str(mount)],
                                 capture_output=True).returncode == 0  # fmt: skip
    if mounted:
        try:
            yield (
                mount / "run",
                lambda: subprocess.run(["mount", "-o", "remount,size=50m", str(mount)], check=True),
            )
        finally:
            subprocess.run(["umount", str(mount)], check=False)
        return
    # Simulated: round 1's best-instance save fails the way Orbax wraps an ENOSPC.
    real, full = checkpoint.Checkpointer.save_best, [True]

    def save_best(self, round_index, params, meta):
        if full[0] and round_index >= 1:
            disk = OSError(errno.ENOSPC, "No space left on device")
            raise ValueError("tensorstore write failed") from disk
        return real(self, round_index, params, meta)

    monkeypatch.setattr(checkpoint.Checkpointer, "save_best", save_best)
    yield mount / "run", lambda: full.__setitem__(0, False)


def test_a_full_disk_ends_with_one_sentence_and_loses_nothing(
    capsys, smoke_run, tmp_path, digits_data_dir, monkeypatch, assert_same_run
):
    with _small_disk(tmp_path, monkeypatch) as (path, grow):
        code, _, err = run_cli(capsys, *smoke(path, digits_data_dir))
        assert code == 2, err
        assert "Traceback" not in err
        last = err.strip().splitlines()[-1]
        match = re.fullmatch(
            rf"jaxes: no space left on the device of {re.escape(str(path))} while saving round "
            r"(\d+); free space and run the same command to resume\.",
            last,
        )
        assert match, err
        grow()
        code, _, err = run_cli(capsys, *smoke(path, digits_data_dir))
        assert code == 0, err
        assert_same_run(smoke_run, path)


def test_a_real_process_on_a_full_disk_prints_only_its_progress_and_one_sentence(
    tmp_path, digits_data_dir
):
    """Orbax's writer threads log their own tracebacks on a full disk, and TensorStore's callbacks
    raise into closed event loops; the user sees none of it, only the run's own lines."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    mount = tmp_path / "disk"
    mount.mkdir()
    cmd = ["mount", "-t", "tmpfs", "-o", "size=150k", "tmpfs", str(mount)]
    if subprocess.run(cmd, capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "jaxes.main", *smoke(mount / "run", digits_data_dir)],
            capture_output=True, text=True, timeout=600, cwd=ROOT,
        )  # fmt: skip
    finally:
        subprocess.run(["umount", str(mount)], check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert re.fullmatch(
        r"jaxes: no space left on the device of .* while saving round \d+; "
        r"free space and run the same command to resume\.",
        lines[-1],
    ), lines
    # Everything before it is the live progress of the rounds.
    assert all(re.match(r"(starting round|round \d+ )", line) for line in lines[:-1]), lines


def test_guard_turns_a_wrapped_enospc_into_disk_full(tmp_path):
    with pytest.raises(guard.DiskFull, match="while saving round 3;"), guard.Guard(tmp_path, 3):
        raise RuntimeError("save failed") from OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(RuntimeError), guard.Guard(tmp_path):
        raise RuntimeError("a bug, not a disk")
