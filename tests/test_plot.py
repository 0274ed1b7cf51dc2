"""Tests for jaxes.plot: the rounds plot; and that the reporting modules import no TF or JAX."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from jaxes import plot

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def red_pixels(path):
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB")).astype(int)
    return int(((rgb[..., 0] > 220) & (rgb[..., 1] < 40) & (rgb[..., 2] < 40)).sum())


def test_plot_rounds_writes_a_png_of_the_asked_size(tmp_path, run_records):
    path = tmp_path / "rounds.png"
    path.write_bytes(b"stale")  # replaced atomically, never appended to
    plot.plot_rounds(
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


def test_plot_rounds_marks_failed_rounds_in_red(tmp_path, run_records, make_records, run_metrics):
    plot.plot_rounds(run_records, tmp_path / "failed.png", metric_name="acc", mode="max")
    repaired = make_records([0.5 if m is None else m for m in run_metrics])
    plot.plot_rounds(repaired, tmp_path / "ok.png", metric_name="acc", mode="max")
    assert red_pixels(tmp_path / "failed.png") > 20
    assert red_pixels(tmp_path / "ok.png") == 0


def test_plot_rounds_min_mode_empty_run_and_bad_mode(tmp_path, run_records):
    plot.plot_rounds(run_records, tmp_path / "min.png", metric_name="val_loss", mode="min")
    plot.plot_rounds([], tmp_path / "empty.png", metric_name="val_loss", mode="min")
    for name in ("min.png", "empty.png"):
        assert (tmp_path / name).read_bytes().startswith(PNG_SIGNATURE)
    with pytest.raises(ValueError, match="mode"):
        plot.plot_rounds(run_records, tmp_path / "bad.png", metric_name="x", mode="maximize")
    assert not (tmp_path / "bad.png").exists()


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
        import jaxes.plot as plot
        import jaxes.progress  # imported only to show that it, too, pulls in nothing
        import jaxes.tboard as tboard
        records = json.load(open({str(tmp_path / "records.json")!r}))
        with tboard.ScalarWriter({str(tmp_path / "tb")!r}) as writer:
            for record in records:
                writer.write_round(record)
        plot.plot_rounds(records, {str(tmp_path / "r.png")!r}, metric_name="m", mode="max")
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


def test_every_stop_reason_is_marked_search_exhausted_included(tmp_path, make_records):
    stopped = make_records([0.5, 0.4, 0.3], patience=2, budget=6)
    assert plot.stop_marker(stopped) == (2, "patience")
    running = make_records([0.5, 0.6], patience=3, budget=6)
    assert plot.stop_marker(running) is None
    # The search ran out after round 1: no record stopped, the summary says why.
    assert plot.stop_marker(running, "search_exhausted") == (1.5, "search_exhausted")
    plot.plot_rounds(running, tmp_path / "a.png", metric_name="acc", mode="max")
    plot.plot_rounds(running, tmp_path / "b.png", metric_name="acc", mode="max",
                     stop_reason="search_exhausted")  # fmt: skip
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "b.png").read_bytes()
