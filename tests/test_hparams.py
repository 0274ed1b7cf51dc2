"""Every round is a TensorBoard HParams session: read back by a real TensorBoard server over HTTP,
and from the event files for the resume rules (never a duplicated or lost session)."""

import contextlib
import json
import math
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from tensorboardX.proto import plugin_hparams_pb2

from jaxes import tboard, workdir
from tests.test_tboard import read_events


def read_sessions(logdir) -> dict[int, dict]:
    """Round index -> its session as written: ``hparams``, ``metrics`` (tag -> value) and
    ``status``, parsed from the event files (one per session directory, checked)."""
    sessions = {}
    root = logdir / tboard.SESSIONS
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        files = list(path.iterdir())
        assert len(files) == 1, f"{path} holds {len(files)} event files"
        session = {"hparams": {}, "metrics": {}, "status": None}
        for event in read_events(path):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name == "hparams":
                    data = plugin_hparams_pb2.HParamsPluginData.FromString(
                        value.metadata.plugin_data.content
                    )
                    if data.HasField("session_start_info"):
                        for name, v in data.session_start_info.hparams.items():
                            session["hparams"][name] = getattr(v, v.WhichOneof("kind"))
                    if data.HasField("session_end_info"):
                        session["status"] = data.session_end_info.status
                else:
                    session["metrics"][value.tag] = value.simple_value
        sessions[int(path.name.removeprefix("round_"))] = session
    return sessions


def _expected_hparams(record) -> dict:
    """What a round's session must hold, from its record (written out, not via tboard)."""
    expected = {k: v for k, v in record["arch"].items() if v is not None}
    for name in ("learning_rate", "weight_decay", "dropout_rate", "generation", "round_index"):
        expected[name] = record[name]
    return {k: float(v) if isinstance(v, int) and not isinstance(v, bool) else v
            for k, v in expected.items()}  # fmt: skip


def test_sessions_hold_each_rounds_fields_metrics_and_status(tmp_path, run_records):
    records = [dict(r, generation=r["round_index"], learning_rate=1e-3, weight_decay=0.0)
               for r in run_records]  # fmt: skip
    records[0]["arch"] = {**records[0]["arch"], "norm": "layer", "residual": True, "skip": None}
    sessions = tboard.Sessions(tmp_path)
    for record in records:
        sessions.write(record)
    got = read_sessions(tmp_path)
    assert sorted(got) == [r["round_index"] for r in records]
    for record in records:
        session = got[record["round_index"]]
        assert session["hparams"] == pytest.approx(_expected_hparams(record))
        failed = record["status"] == "failed"
        assert session["status"] == (2 if failed else 1)  # STATUS_FAILURE : STATUS_SUCCESS
        if failed:
            assert "hparams/metric" not in session["metrics"]
        else:
            assert session["metrics"]["hparams/metric"] == pytest.approx(record["metric"])
            assert session["metrics"]["hparams/val_loss"] == pytest.approx(record["val_loss"])
        assert session["metrics"]["hparams/epochs"] == record["epochs"]
    assert got[0]["hparams"]["norm"] == "layer" and got[0]["hparams"]["residual"] is True
    assert "skip" not in got[0]["hparams"]


def test_sync_keeps_exactly_the_committed_rounds(tmp_path, run_records):
    """A resume drops sessions past the commit and rewrites a committed round's missing one."""
    sessions = tboard.Sessions(tmp_path)
    for record in run_records:  # a killed run wrote all of them; 4 were committed
        sessions.write(record)
    written = read_sessions(tmp_path)
    committed = run_records[:4]
    (tmp_path / tboard.session_name(1)).rename(tmp_path / "lost")  # lost, e.g. by an old version
    (tmp_path / (tboard.session_name(2) + ".partial")).mkdir()  # a write cut short by a kill
    (tmp_path / tboard.SESSIONS / "stray.txt").write_text("not a session")
    sessions.sync(committed)
    assert sessions.on_disk() == [0, 1, 2, 3]
    assert sorted(p.name for p in (tmp_path / tboard.SESSIONS).iterdir()) == [
        "round_00000", "round_00001", "round_00002", "round_00003",
    ]  # fmt: skip
    again = read_sessions(tmp_path)
    assert again == {i: written[i] for i in range(4)}
    sessions.sync(committed)  # idempotent
    assert read_sessions(tmp_path) == again


def test_disabled_sessions_write_nothing(tmp_path, run_records):
    sessions = tboard.Sessions(tmp_path / "tb", enabled=False)
    sessions.write(run_records[0])
    sessions.sync(run_records)
    assert not (tmp_path / "tb").exists()


# A real TensorBoard server -------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


_ALL_STATUSES = ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"]


def test_tensorboard_serves_every_round_as_an_hparams_session(smoke_run):
    records = workdir.read_rounds(smoke_run)
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", f"--logdir={smoke_run / 'tensorboard'}",
         "--host=127.0.0.1", f"--port={port}", "--load_fast=false", "--reload_interval=1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}/data/plugin/hparams"
    request = {"startIndex": 0, "sliceSize": 1000, "allowedStatuses": _ALL_STATUSES,
               "colParams": [], "aggregationType": "AGGREGATION_AVG"}  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        groups = []
        while len(groups) < len(records):  # the server loads the logdir in the background
            assert server.poll() is None, server.stderr.read().decode()
            assert time.monotonic() < deadline, f"TensorBoard served {len(groups)} sessions"
            with contextlib.suppress(OSError):  # not listening yet
                groups = _post(f"{base}/session_groups", request).get("sessionGroups", [])
            time.sleep(0.25)
        experiment = _post(f"{base}/experiment", {"experimentName": ""})
    finally:
        server.terminate()
        server.wait(timeout=30)
    # The experiment lists every searched field and hyper-parameter, and the round metrics.
    names = {info["name"] for info in experiment["hparamInfos"]}
    assert names == set(_expected_hparams(records[0]))
    assert {"backbone", "width", "embed_dim", "learning_rate", "dropout_rate"} <= names
    tags = {info["name"]["tag"] for info in experiment["metricInfos"]}
    assert {"hparams/metric", "hparams/val_accuracy", "hparams/val_loss"} <= tags
    # One session per round, with its own fields and metrics.
    by_name = {group["name"]: group for group in groups}
    assert len(by_name) == len(groups) == len(records)
    for record in records:
        group = by_name[tboard.session_name(record["round_index"])]
        assert [s["status"] for s in group["sessions"]] == ["STATUS_SUCCESS"]
        assert group["hparams"] == pytest.approx(_expected_hparams(record))
        metrics = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
        for key in ("metric", "val_accuracy", "val_loss", "train_loss", "epochs"):
            assert math.isclose(metrics[f"hparams/{key}"], record[key], rel_tol=1e-6), key
