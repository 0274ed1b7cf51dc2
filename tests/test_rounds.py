"""The rounds job end to end: resume after SIGKILL (killed real processes, resumed in this one,
where the compiled programs are already warm), reproducibility and multi-process runs.
Misuse and its messages are tested in test_cli.py."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from jaxes import stopping, tboard, workdir
from tests.conftest import device_flags

ROOT = Path(__file__).resolve().parents[1]
SMOKE = f"--config={ROOT / 'configs' / 'digits.py'}:smoke"


def _env(devices: int = 1) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    env["XLA_FLAGS"] = device_flags(devices)
    return env


def _cmd(workdir_path, data_dir, *extra):
    return [
        sys.executable, "-m", "jaxes.main", SMOKE, f"--workdir={workdir_path}",
        f"--config.data_dir={data_dir}", *extra,
    ]  # fmt: skip


def _run_here(workdir_path, data_dir) -> dict:
    """The smoke run in this process (the compiled programs are shared with earlier tests)."""
    from ml_collections.config_flags import config_flags

    from jaxes import rounds

    config = config_flags.ConfigFileFlagParser("config").parse(SMOKE.split("=", 1)[1])
    with config.unlocked():
        config.data_dir = str(data_dir)
    with open(os.devnull, "w") as quiet:
        return rounds.run(config, workdir_path, stream=quiet)


def _run_killed(workdir_path, data_dir, ready, cmd=None) -> None:
    """Starts a run (``cmd``, default the smoke run) and SIGKILLs it once ``ready(path)`` holds."""
    proc = subprocess.Popen(
        cmd or _cmd(workdir_path, data_dir), env=_env(), cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 300
    try:
        while not ready(workdir_path):
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "timed out waiting to kill the run"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL


def _committed_rounds(path) -> int:
    state_file = Path(path) / "checkpoints" / "resume_state.json"
    try:
        return json.loads(state_file.read_text())["next_round"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


@pytest.fixture(scope="module")
def reference(smoke_run):
    """One uninterrupted smoke run."""
    return smoke_run


def test_reference_run_writes_the_workdir(reference):
    for name in (
        "config.json",
        "rounds.jsonl",
        "summary.json",
        "rounds.png",
        "data.json",
    ):
        assert (reference / name).is_file(), name
    # configs/digits.py:smoke has plots off (the folder run in test_folder.py draws them).
    assert not list(reference.glob("neighbors.png")) + list(reference.glob("embedding.png"))
    assert list((reference / "tensorboard").iterdir())
    summary = workdir.read_summary(reference)
    records = workdir.read_rounds(reference)
    assert summary["rounds_run"] == len(records) >= 1
    assert (
        summary["best_round"]
        == max(
            (r for r in records if r["metric"] is not None),
            key=lambda r: (r["metric"], -r["round_index"]),
        )["round_index"]
    )
    assert 0.0 <= summary["test_metric"] <= 1.0
    assert 0.0 <= summary["knn_top1"] <= 1.0


def test_two_fresh_runs_are_identical(reference, tmp_path, digits_data_dir, assert_same_run):
    _run_here(tmp_path, digits_data_dir)
    assert_same_run(reference, tmp_path)


def _same_sessions(reference, path) -> None:
    """The HParams sessions of a resumed run are the uninterrupted run's: none lost or doubled."""
    from tests.test_hparams import read_sessions

    def strip(sessions):  # wall times differ between runs
        for session in sessions.values():
            session["metrics"].pop("hparams/wall_seconds")
        return sessions

    expected = strip(read_sessions(reference / "tensorboard"))
    assert sorted(expected) == [r["round_index"] for r in workdir.read_rounds(reference)]
    assert strip(read_sessions(path / "tensorboard")) == expected


def test_resume_after_sigkill_between_rounds(reference, tmp_path, digits_data_dir, assert_same_run):
    _run_killed(tmp_path, digits_data_dir, lambda p: _committed_rounds(p) >= 2)
    assert not (tmp_path / "summary.json").exists()
    _run_here(tmp_path, digits_data_dir)
    assert_same_run(reference, tmp_path)
    _same_sessions(reference, tmp_path)


def test_resume_after_sigkill_mid_round(reference, tmp_path, digits_data_dir, assert_same_run):
    # Round 0 committed plus a short wait lands the kill inside round 1's training (rounds take
    # seconds); the deterministic kill points below cover the narrow windows.
    def in_round_one(path):
        if _committed_rounds(path) < 1:
            return False
        time.sleep(0.3)
        return True

    _run_killed(tmp_path, digits_data_dir, in_round_one)
    _run_here(tmp_path, digits_data_dir)
    assert_same_run(reference, tmp_path)


def test_a_run_saved_before_depth_buckets_resumes_only_without_them(reference, tmp_path):
    """A config.json written before ``parallel.pad_depth_backbones`` existed holds ``()``, the
    engine those runs trained with: resuming it asks for that value, by name."""
    current = workdir.read_config(reference)
    assert current["parallel"]["pad_depth_backbones"] == ["mlp"]
    saved = json.loads(json.dumps(current))
    del saved["parallel"]["pad_depth_backbones"]
    old = tmp_path / "old"
    old.mkdir()
    (old / workdir.CONFIG).write_text(json.dumps(saved))
    with pytest.raises(
        workdir.WorkdirError, match=r"pad_depth_backbones is \['mlp'\] now but \[\]"
    ):
        workdir.check(old, current)
    current["parallel"]["pad_depth_backbones"] = []
    assert workdir.check(old, current)


def test_rounds_jsonl_replays_the_stop(reference):
    summary = workdir.read_summary(reference)
    config = json.loads((reference / "config.json").read_text())
    tol = dict(config["tolerance"])
    assert tol.pop("r") is None and tol.pop("patience") is None, "smoke must draw r from its seed"
    assert tol.pop("rule") == "patent" and summary["rule"] == "patent"
    tol.pop("gain")  # the gain rule's own fields
    state = stopping.init(config["rounds"], r=summary["r"], mode=config["mode"], **tol)
    assert state.patience == summary["patience"]
    for record in workdir.read_rounds(reference):
        metric = record["metric"]
        state = stopping.update(state, float("nan") if metric is None else metric)
    assert state.round == summary["rounds_run"]
    assert state.reason == summary["stop_reason"]
    assert state.best_round == summary["best_round"]
    assert state.rounds == summary["rounds_budget"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two_processes(workdir_path, data_dir, *extra, timeout=600) -> list[tuple[str, str]]:
    """The smoke run as two gloo processes on localhost; their (stdout, stderr), both exit 0."""
    port = _free_port()
    procs = [
        subprocess.Popen(
            _cmd(
                workdir_path,
                data_dir,
                *extra,
                f"--coordinator=127.0.0.1:{port}",
                "--num_processes=2",
                f"--process_id={i}",
            ),
            env=_env(),
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=timeout) for p in procs]
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, f"{out}\n{err[-3000:]}"
    return outputs


def test_two_processes_match_one(reference, tmp_path, digits_data_dir):
    outputs = _run_two_processes(tmp_path, digits_data_dir)
    one, two = workdir.read_summary(reference), workdir.read_summary(tmp_path)
    assert two["best_round"] == one["best_round"]
    assert abs(two["best_metric"] - one["best_metric"]) <= 1e-3
    # Only process 0 writes: one line per round, one event file, one summary table.
    assert len(workdir.read_rounds(tmp_path)) == two["rounds_run"]
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert ["best round" in out for out, _ in outputs] == [True, False]


# Runs the CLI in a process that dies (os._exit, as abruptly as SIGKILL) at an exact point.
_KILLER = textwrap.dedent(
    """
    import os, runpy, sys
    from jaxes import checkpoint

    point = os.environ["JAXES_TEST_KILL_AT"]
    Checkpointer = checkpoint.Checkpointer
    save_state, delete_steps = Checkpointer.save_state, Checkpointer._delete_steps

    def dying_save_state(self, state):
        if point == "after_best_before_commit" and state["next_round"] == 2:
            os._exit(137)  # round 1 saved its new best but never committed
        return save_state(self, state)

    def dying_delete_steps(self, steps):
        if point == "after_commit_mid_prune" and steps:
            os._exit(137)  # round 1 committed; the old best is still on disk
        return delete_steps(self, steps)

    Checkpointer.save_state = dying_save_state
    Checkpointer._delete_steps = dying_delete_steps
    sys.argv = ["jaxes.main", *sys.argv[1:]]
    runpy.run_module("jaxes.main", run_name="__main__")
    """
)


@pytest.mark.parametrize("point", ["after_best_before_commit", "after_commit_mid_prune"])
def test_resume_after_a_kill_at_an_exact_point(
    reference, tmp_path, digits_data_dir, assert_same_run, point
):
    records = workdir.read_rounds(reference)
    assert records[1]["improved"], "the smoke run must set a new best in round 1"
    killed = subprocess.run(
        [sys.executable, "-c", _KILLER, *_cmd(tmp_path, digits_data_dir)[3:]],
        env=dict(_env(), JAXES_TEST_KILL_AT=point),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert killed.returncode == 137, killed.stderr
    assert len(list((tmp_path / "checkpoints").glob("[0-9]*"))) == 2  # two bests on disk
    # Round 1's session was written before its commit, which never came: the resume drops it.
    assert tboard.Sessions(tmp_path / "tensorboard").on_disk() == [0, 1]
    _run_here(tmp_path, digits_data_dir)
    assert [p.name for p in (tmp_path / "checkpoints").glob("[0-9]*")] == [
        str(workdir.read_summary(reference)["best_round"])
    ]
    assert_same_run(reference, tmp_path)
    _same_sessions(reference, tmp_path)


def _smoke_config(data_dir):
    """A fresh ``configs/digits.py:smoke`` config reading ``data_dir`` (configs/ is no package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("digits_config", ROOT / "configs" / "digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("smoke")
    config.data_dir = str(data_dir)
    return config


def test_a_run_hands_the_engine_the_next_generation_it_will_train(
    tmp_path, digits_data_dir, monkeypatch
):
    """Random search sees ahead: each generation's ``upcoming`` jobs are exactly the next one's."""
    import jax

    from jaxes import rounds, train

    config = _smoke_config(digits_data_dir)
    config.search.space.learning_rate = (1e-3, 3e-3)  # a job's traced fields are compared too
    real = train.Engine.train
    calls = []

    def record(engine, jobs, upcoming=()):
        calls.append((list(jobs), list(upcoming)))
        return real(engine, jobs, upcoming)

    monkeypatch.setattr(train.Engine, "train", record)
    summary = rounds.run(config, tmp_path, stream=open(os.devnull, "w"))  # noqa: SIM115

    def fields(job):
        key = jax.random.key_data(job.key).tolist()
        return (job.arch, job.learning_rate, job.weight_decay, key)

    assert len(calls) == summary["rounds_run"] >= 3
    for (_, upcoming), (following, _) in itertools.pairwise(calls):
        assert [fields(j) for j in upcoming] == [fields(j) for j in following]
    # The last generation looked ahead too, into the budget it started with: a round never run.
    budget = workdir.read_rounds(tmp_path)[-2]["rounds_budget"]  # after the round before it
    assert len(calls[-1][1]) == (1 if budget > summary["rounds_run"] else 0)


def test_a_diverging_round_is_recorded_as_failed_and_the_run_goes_on(
    tmp_path, digits_data_dir, monkeypatch
):
    """Round 1 trains with a learning rate that makes its loss non-finite (real divergence)."""
    from jaxes import rounds, train

    config = _smoke_config(digits_data_dir)
    config.tolerance.r = -0.1  # tolerance 3 of 4 rounds: a failure alone cannot end the run
    real = train.Engine.train
    calls = []

    def diverge_in_round_one(engine, jobs, upcoming=()):
        calls.append(jobs)
        if len(calls) == 2:  # K = 1: the second generation is round 1
            jobs = [dataclasses.replace(job, learning_rate=1e30) for job in jobs]
        return real(engine, jobs, upcoming)

    monkeypatch.setattr(train.Engine, "train", diverge_in_round_one)
    summary = rounds.run(config, tmp_path, stream=open(os.devnull, "w"))  # noqa: SIM115
    records = workdir.read_rounds(tmp_path)
    assert [r["status"] for r in records][:3] == ["ok", "failed", "ok"]
    failed = records[1]
    assert failed["metric"] is None and "epoch" in failed["message"]
    assert failed["streak"] == records[0]["streak"] + 1  # a failure counts as below the best
    assert summary["rounds_run"] == len(records) >= 3
    assert summary["best_round"] != 1
