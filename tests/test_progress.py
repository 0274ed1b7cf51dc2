"""Tests for jaxes.progress: the live and plain progress output, and the summary table."""

import io

from jaxes import progress as progress_lib


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_live_line_has_streak_tolerance_and_eta(run_records):
    stream, clock = io.StringIO(), FakeClock()
    progress = progress_lib.Progress(stream=stream, live=True, clock=clock, width=200)
    budget = run_records[0]["rounds_budget"]
    progress.start_round(0, budget)
    clock.now = 10.0  # the first round takes 10 s of fake time
    progress.end_round(run_records[0])
    progress.start_round(1, budget)
    clock.now = 12.0
    progress.epoch(3, val_loss=0.2)
    progress.close()
    output = stream.getvalue()
    assert "\r" in output
    last_line = output.rsplit("\r", 1)[-1]
    assert f"streak {run_records[0]['streak']}/{run_records[0]['patience']}" in last_line
    assert "epoch 3" in last_line
    # 8 s left of round 1 at the 10 s mean, then rounds 2 .. budget-1 at 10 s each.
    eta_seconds = 8 + 10 * (budget - 2)
    assert f"ETA {eta_seconds // 60}:{eta_seconds % 60:02d}" in last_line
    assert output.endswith("\n")


def test_progress_plain_prints_one_line_per_round(run_records):
    stream, clock = io.StringIO(), FakeClock()
    progress = progress_lib.Progress(stream=stream, live=False, clock=clock)
    for record in run_records:
        progress.start_round(record["round_index"], record["rounds_budget"])
        for epoch in range(record["epochs"]):
            clock.now += 1.0
            progress.epoch(epoch, val_loss=0.1)
        progress.end_round(record)
    progress.close()
    output = stream.getvalue()
    assert "\r" not in output and "\x1b" not in output
    lines = output.splitlines()
    assert len(lines) == len(run_records)
    for line, record in zip(lines, run_records, strict=True):
        assert line.startswith(f"round {record['round_index']} ")
        assert f"streak {record['streak']}/{record['patience']}" in line
    assert "failed" in lines[2].lower() and "patience" in lines[-1]


def test_progress_default_is_plain_off_a_terminal_and_disabled_is_silent(run_records):
    stream = io.StringIO()  # isatty() is False
    progress = progress_lib.Progress(stream=stream, clock=FakeClock())
    progress.start_round(0, 6)
    progress.epoch(0)
    assert stream.getvalue() == ""
    silent = io.StringIO()
    quiet = progress_lib.Progress(stream=silent, live=True, enabled=False, clock=FakeClock())
    quiet.start_round(0, 6)
    quiet.epoch(0)
    quiet.end_round(run_records[0])
    quiet.close()
    assert silent.getvalue() == ""


def test_progress_throttles_epoch_redraws():
    stream, clock = io.StringIO(), FakeClock()
    progress = progress_lib.Progress(stream=stream, live=True, clock=clock, width=200)
    progress.start_round(0, 10)
    after_start = stream.getvalue().count("\r")
    clock.now = 0.5
    for epoch in range(50):  # 50 epochs within 0.05 s of fake time
        progress.epoch(epoch)
        clock.now += 0.001
    assert stream.getvalue().count("\r") == after_start + 1
    clock.now = 0.65  # 0.15 s after the last redraw
    progress.epoch(50)
    assert stream.getvalue().count("\r") == after_start + 2
    assert stream.getvalue().rsplit("\r", 1)[-1].startswith("round 0 ")


def test_summary_table_lists_every_round_and_the_stop(run_records):
    last = run_records[-1]
    summary = {
        "best_round": last["best_round"],
        "best_metric": last["best"],
        "metric": "val_accuracy",
        "mode": "max",
        "test_metric": 0.9512,
        "rounds_run": len(run_records),
        "rounds_budget": last["rounds_budget"],
        "patience": last["patience"],
        "r": -0.25,
        "stop_reason": last["reason"],
        "best_arch": run_records[last["best_round"]]["arch"],
        "seed": 0,
        "wall_seconds": 75.0,
        "knn_top1": 0.9377,
    }
    table = progress_lib.summary_table(summary, run_records)
    lines = table.splitlines()
    assert all(len(line) <= 100 for line in lines)
    rows = {line.split()[0]: line for line in lines if line.split() and line.split()[0].isdigit()}
    assert set(rows) >= {str(record["round_index"]) for record in run_records}
    assert "*" in rows[str(last["best_round"])]
    assert "failed" in rows["2"]
    assert last["reason"] in table
    for text in ("0.9512", "0.9377", "1:15"):
        assert text in table
    without_knn = {key: value for key, value in summary.items() if key != "knn_top1"}
    assert "0.9377" not in progress_lib.summary_table(without_knn, run_records)


def test_the_live_line_knows_the_patience_from_round_0():
    stream = io.StringIO()
    progress = progress_lib.Progress(stream=stream, live=True, clock=FakeClock(), width=200)
    progress.start_round(0, 12, patience=7)
    assert "streak 0/7" in stream.getvalue().rsplit("\r", 1)[-1]


def test_fixed_patience_and_plurals_read_right(run_records):
    record = dict(run_records[0], epochs=1)
    stream = io.StringIO()
    progress = progress_lib.Progress(stream=stream, live=False, clock=FakeClock())
    progress.start_round(0, 6, patience=3)
    progress.end_round(record)
    assert ", 1 epoch, " in stream.getvalue()
    summary = {"patience": 5, "r": None, "rounds_run": 1, "rounds_budget": 6}
    table = progress_lib.summary_table(summary, [record])
    assert "patience     5 (fixed patience)" in table.splitlines()
    assert "r = -" not in table
    assert progress_lib.plural(1, "round") == "1 round"
    assert progress_lib.plural(0, "round") == "0 rounds"
