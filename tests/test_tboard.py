"""Tests for jaxes.tboard: TensorBoard scalars, read back from the event files' own framing."""

import os
import struct

import pytest
from tensorboardX.proto import event_pb2

from jaxes import tboard


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
    with tboard.ScalarWriter(logdir) as writer:
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
    with tboard.ScalarWriter(logdir, enabled=False) as writer:
        writer.write_round(run_records[0])
    assert not logdir.exists()


def test_scalar_writer_rejects_non_numbers(tmp_path):
    with tboard.ScalarWriter(tmp_path, enabled=False) as writer, pytest.raises(TypeError):
        writer.write_scalars(0, {"round/metric": "high"})
