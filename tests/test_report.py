"""``python -m jaxes.report``: reads finished, running and killed runs, and writes nothing."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from jaxes import files, report, workdir

ROOT = Path(__file__).resolve().parents[1]


def _state(path) -> dict:
    return {
        str(p.relative_to(path)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(Path(path).rglob("*"))
        if p.is_file()
    }


def _report(capsys, *argv) -> tuple[int, str, str]:
    code = 0
    try:
        report.main(list(argv))
    except SystemExit as exit_:
        code = exit_.code
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def killed(smoke_run, tmp_path) -> Path:
    """The files a run killed in round 2 leaves: rounds 0-1 committed, round 2 appended but
    never committed (plus a torn line), no summary."""
    path = tmp_path / "killed"
    shutil.copytree(smoke_run, path)
    (path / files.SUMMARY).unlink()
    state_path = path / files.CHECKPOINTS / files.RESUME_STATE
    state = json.loads(state_path.read_text())
    state["next_round"] = 2
    state_path.write_text(json.dumps(state))
    lines = (path / files.ROUNDS).read_text().splitlines(keepends=True)
    (path / files.ROUNDS).write_text("".join(lines[:3]) + lines[3][:20])
    return path


def test_one_finished_run_is_a_table_of_its_rounds(capsys, smoke_run):
    before = _state(smoke_run)
    code, out, _ = _report(capsys, str(smoke_run))
    assert code == 0
    records, summary = workdir.read_rounds(smoke_run), workdir.read_summary(smoke_run)
    head, columns, _, *rows = out.strip().splitlines()
    assert head.startswith(f"{smoke_run}: finished (stop: {summary['stop_reason']}), ")
    assert f"at round {summary['best_round']}" in head
    assert columns.split() == list(report.ROUND_COLUMNS)
    assert len(rows) == len(records)
    for row, record in zip(rows, records, strict=True):
        cells = row.split()
        assert cells[0] == str(record["round_index"])
        assert f"{record['metric']:.4f}" in cells
    assert _state(smoke_run) == before


def test_csv_of_one_run_has_the_exact_values(capsys, smoke_run):
    code, out, _ = _report(capsys, str(smoke_run), "--csv")
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    records = workdir.read_rounds(smoke_run)
    assert [float(r["metric"]) for r in rows] == [r["metric"] for r in records]
    assert [int(r["epochs"]) for r in rows] == [r["epochs"] for r in records]
    assert [r["best"] for r in rows].count("True") == 1


def test_a_killed_run_shows_only_its_committed_rounds(capsys, killed):
    before = _state(killed)
    code, out, _ = _report(capsys, str(killed))
    assert code == 0
    head, _, _, *rows = out.strip().splitlines()
    assert head.startswith(f"{killed}: stopped, 2 rounds of budget ")
    assert [row.split()[0] for row in rows] == ["0", "1"]
    assert _state(killed) == before


def test_a_running_run_is_reported_while_it_holds_its_lock(capsys, killed):
    with workdir.lock(killed):
        before = _state(killed)
        code, out, _ = _report(capsys, str(killed))
        assert workdir.is_locked(killed)  # the peek released nothing
    assert code == 0
    assert out.startswith(f"{killed}: running, 2 rounds")
    assert _state(killed) == before


def test_several_runs_are_one_row_each_and_csv(capsys, smoke_run, killed):
    code, out, _ = _report(capsys, str(smoke_run), str(killed))
    assert code == 0
    columns, _, finished, stopped = out.strip().splitlines()
    assert columns.split() == list(report.RUN_COLUMNS)
    summary = workdir.read_summary(smoke_run)
    assert finished.split()[:2] == [str(smoke_run), "finished"]
    assert f"{summary['test_metric']:.4f}" in finished.split()
    assert stopped.split()[:2] == [str(killed), "stopped"]
    code, out, _ = _report(capsys, str(smoke_run), str(killed), "--csv")
    rows = list(csv.DictReader(io.StringIO(out)))
    assert [r["status"] for r in rows] == ["finished", "stopped"]
    assert float(rows[0]["best"]) == summary["best_metric"]
    assert rows[1]["test"] == "" and rows[1]["rounds"] == "2"


def test_plot_redraws_rounds_png(capsys, killed):
    (killed / files.PLOT).unlink()
    code, _, err = _report(capsys, str(killed), "--plot")
    assert code == 0
    assert (killed / files.PLOT).read_bytes().startswith(b"\x89PNG")
    assert err.strip() == f"wrote {killed / files.PLOT}"


def test_a_path_that_is_no_run_exits_2_with_one_sentence(capsys, tmp_path):
    code, _, err = _report(capsys, str(tmp_path))
    assert code == 2
    assert err.strip().startswith(f"jaxes: {tmp_path} has no config.json")
    assert len(err.strip().splitlines()) == 1


def test_the_report_imports_no_jax(smoke_run):
    probe = (
        "import sys; from jaxes import report; assert report.main([sys.argv[1]]) == 0; "
        "assert 'jax' not in sys.modules, 'jaxes.report imported jax'"
    )
    proc = subprocess.run([sys.executable, "-c", probe, str(smoke_run)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_a_live_run_then_the_same_run_killed_are_read_as_they_stand(
    capsys, tmp_path, digits_data_dir
):
    # A real run in its own process: read while it runs (it holds the lock), then after SIGKILL.
    import signal

    from tests.test_cli import _committed, _start, _wait_for

    proc = _start(tmp_path, digits_data_dir)
    try:
        _wait_for(lambda: _committed(tmp_path) >= 1, proc, "round 0 was committed")
        proc.send_signal(signal.SIGSTOP)  # alive and holding its lock, but it cannot finish now
        code, out, _ = _report(capsys, str(tmp_path))
        assert code == 0 and out.startswith(f"{tmp_path}: running, "), out
        code, out, _ = _report(capsys, str(tmp_path), "--csv")  # one run: a row per round
        assert code == 0
        seen = [int(r["round"]) for r in csv.DictReader(io.StringIO(out))]
        assert seen and seen == list(range(len(seen)))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate()
    committed = _committed(tmp_path)
    before = _state(tmp_path)
    code, out, _ = _report(capsys, str(tmp_path))
    assert code == 0
    head, _, _, *rows = out.strip().splitlines()
    assert head.startswith(f"{tmp_path}: stopped, {committed} round"), head
    assert [int(r.split()[0]) for r in rows] == list(range(committed))  # committed rounds only
    code, out, _ = _report(capsys, str(tmp_path), "--csv")
    assert [int(r["round"]) for r in csv.DictReader(io.StringIO(out))] == list(range(committed))
    assert _state(tmp_path) == before  # reading wrote nothing
