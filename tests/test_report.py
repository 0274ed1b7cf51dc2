"""Tests for jaxes.report: the rounds plot, TensorBoard scalars, progress output, summary table."""

import io
import json
import os
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

from jaxes import report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def make_records(metrics, *, patience=3, budget=6):
    """Round records for a max-mode run, following DESIGN.md §3 (ties reset, budget extension).

    A None metric is a failed round: it counts as below the best.
    """
    records, best, best_round, streak = [], None, None, 0
    for round_index, metric in enumerate(metrics):
        improved = metric is not None and (best is None or metric > best)
        if improved:
            best, best_round, streak = metric, round_index, 0
        elif metric is not None and metric >= best:
            streak = 0
        else:
            streak += 1
        count = round_index + 1
        stopped = streak >= patience
        if not stopped and patience > budget - count:
            budget = count + patience
        records.append(
            {
                "round_index": round_index,
                "status": "ok" if metric is not None else "failed",
                "message": None if metric is not None else f"loss became nan at epoch {count}",
                "arch": {"backbone": "mlp", "depth": 2, "width": 64 * count, "embed_dim": 32},
                "seed": 0,
                "dropout_rate": 0.1 + 0.01 * round_index,
                "log_rate": -2.0,
                "epochs": 10 + round_index,
                "best_epoch": 5,
                "metric": metric,
                "val_loss": 0.5 - 0.01 * round_index,
                "val_accuracy": metric,
                "train_loss": 0.3,
                "improved": improved,
                "best": best,
                "best_round": best_round,
                "streak": streak,
                "patience": patience,
                "rounds_budget": budget,
                "stopped": stopped,
                "reason": "patience" if stopped else None,
                "wall_seconds": 2.0 + round_index,
            }
        )
        if stopped:
            break
    return records


# A failed round (2), budget extensions (6 -> 7 -> 8 -> 9) and a stop by patience at round 6.
RUN_METRICS = [0.90, 0.95, None, 0.96, 0.94, 0.93, 0.92]


@pytest.fixture
def run_records():
    records = make_records(RUN_METRICS)
    assert records[-1]["stopped"] and records[-1]["rounds_budget"] > records[0]["rounds_budget"]
    return records


def red_pixels(path):
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB")).astype(int)
    return int(((rgb[..., 0] > 220) & (rgb[..., 1] < 40) & (rgb[..., 2] < 40)).sum())


def test_plot_rounds_writes_a_png_of_the_asked_size(tmp_path, run_records):
    path = tmp_path / "rounds.png"
    path.write_bytes(b"stale")  # replaced atomically, never appended to
    report.plot_rounds(
        run_records, path, metric_name="val_accuracy", mode="max", figsize=(6, 4), dpi=50
    )
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 5_000
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        assert image.size == (6 * 50, 4 * 50)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rounds.png"]  # no temporary left


def test_plot_rounds_marks_failed_rounds_in_red(tmp_path, run_records):
    report.plot_rounds(run_records, tmp_path / "failed.png", metric_name="acc", mode="max")
    repaired = make_records([0.5 if m is None else m for m in RUN_METRICS])
    report.plot_rounds(repaired, tmp_path / "ok.png", metric_name="acc", mode="max")
    assert red_pixels(tmp_path / "failed.png") > 20
    assert red_pixels(tmp_path / "ok.png") == 0


def test_plot_rounds_min_mode_empty_run_and_bad_mode(tmp_path, run_records):
    report.plot_rounds(run_records, tmp_path / "min.png", metric_name="val_loss", mode="min")
    report.plot_rounds([], tmp_path / "empty.png", metric_name="val_loss", mode="min")
    for name in ("min.png", "empty.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG_SIGNATURE)
    with pytest.raises(ValueError, match="mode"):
        report.plot_rounds(run_records, tmp_path / "bad.png", metric_name="x", mode="maximize")
    assert not (tmp_path / "bad.png").exists()


def crc32c(data):
    """CRC-32C (Castagnoli), bitwise; written here so the framing is checked independently."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data):
    crc = crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(logdir):
    """Parses every TFRecord-framed Event in the logdir's event files."""
    events = []
    for name in sorted(os.listdir(logdir)):
        assert name.startswith("events.out.tfevents."), name
        data = (logdir / name).read_bytes()
        offset = 0
        while offset < len(data):
            header = data[offset : offset + 8]
            (length,) = struct.unpack("<Q", header)
            (header_crc,) = struct.unpack("<I", data[offset + 8 : offset + 12])
            payload = data[offset + 12 : offset + 12 + length]
            (payload_crc,) = struct.unpack("<I", data[offset + 12 + length : offset + 16 + length])
            assert header_crc == masked_crc32c(header)
            assert payload_crc == masked_crc32c(payload)
            events.append(event_pb2.Event.FromString(payload))
            offset += 16 + length
    return events


def scalar_values(events):
    return {
        (value.tag, event.step): value.simple_value
        for event in events
        for value in event.summary.value
    }


def test_crc32c_helper_matches_the_standard_check_value():
    assert crc32c(b"123456789") == 0xE3069283


def test_scalar_writer_round_trip(tmp_path, run_records):
    logdir = tmp_path / "tb"
    with report.ScalarWriter(logdir) as writer:
        for record in run_records:
            writer.write_round(record)
        writer.write_scalars(7, {"test/metric": 0.875, "test/skipped": None})
    values = scalar_values(read_events(logdir))
    for record in run_records:
        step = record["round_index"]
        for key in ("best", "streak", "patience", "val_loss", "dropout_rate", "epochs"):
            assert values[(f"round/{key}", step)] == pytest.approx(record[key], rel=1e-6)
        assert values[("round/wall_seconds", step)] == pytest.approx(record["wall_seconds"])
        if record["metric"] is None:
            assert ("round/metric", step) not in values
        else:
            assert values[("round/metric", step)] == pytest.approx(record["metric"], rel=1e-6)
    assert values[("test/metric", 7)] == 0.875
    assert not any(tag == "test/skipped" for tag, _ in values)


def test_scalar_writer_disabled_writes_nothing(tmp_path, run_records):
    logdir = tmp_path / "tb"
    with report.ScalarWriter(logdir, enabled=False) as writer:
        writer.write_round(run_records[0])
    assert not logdir.exists()


def test_scalar_writer_rejects_non_numbers(tmp_path):
    with report.ScalarWriter(tmp_path, enabled=False) as writer, pytest.raises(TypeError):
        writer.write_scalars(0, {"round/metric": "high"})


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_live_line_has_streak_tolerance_and_eta(run_records):
    stream, clock = io.StringIO(), FakeClock()
    progress = report.Progress(stream=stream, live=True, clock=clock, width=200)
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
    progress = report.Progress(stream=stream, live=False, clock=clock)
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
    progress = report.Progress(stream=stream, clock=FakeClock())
    progress.start_round(0, 6)
    progress.epoch(0)
    assert stream.getvalue() == ""
    silent = io.StringIO()
    quiet = report.Progress(stream=silent, live=True, enabled=False, clock=FakeClock())
    quiet.start_round(0, 6)
    quiet.epoch(0)
    quiet.end_round(run_records[0])
    quiet.close()
    assert silent.getvalue() == ""


def test_progress_throttles_epoch_redraws():
    stream, clock = io.StringIO(), FakeClock()
    progress = report.Progress(stream=stream, live=True, clock=clock, width=200)
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
    table = report.summary_table(summary, run_records)
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
    assert "0.9377" not in report.summary_table(without_knn, run_records)


def test_no_tensorflow_no_jax_no_pyplot(tmp_path, run_records):
    # A stub `tensorflow` that imports silently: any import of it, even a guarded one, would show.
    stub = tmp_path / "stub" / "tensorflow"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("")
    (tmp_path / "records.json").write_text(json.dumps(run_records))
    script = textwrap.dedent(
        f"""
        import importlib.util, json, sys
        assert importlib.util.find_spec("tensorflow") is not None  # the stub is reachable
        import jaxes.report as report
        records = json.load(open({str(tmp_path / "records.json")!r}))
        with report.ScalarWriter({str(tmp_path / "tb")!r}) as writer:
            for record in records:
                writer.write_round(record)
        report.plot_rounds(records, {str(tmp_path / "r.png")!r}, metric_name="m", mode="max")
        print(json.dumps(sorted(name for name in sys.modules)))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "stub")}
    result = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    modules = set(json.loads(result.stdout))
    assert "tensorboardX" in modules and "matplotlib" in modules  # the check ran for real
    assert "tensorflow" not in modules
    assert not any(name == "jax" or name.startswith(("jax.", "flax")) for name in modules)
    assert "matplotlib.pyplot" not in modules
