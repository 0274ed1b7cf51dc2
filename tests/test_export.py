"""``python -m jaxes.export`` and ``jaxes.serving``: the artifact runs in a process without Flax
and gives the embed command's features."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxes import serving, workdir

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu")
BATCHES = {1: slice(0, 1), 7: slice(10, 17)}  # batch size -> rows of the test split

# Runs in a fresh interpreter: embeds with the export alone, then checks what it imported.
SERVE = textwrap.dedent(
    """
    import sys
    import numpy as np
    from jaxes import serving

    export_dir, images_file, out_file = sys.argv[1:]
    embedder = serving.load(export_dir)
    images = np.load(images_file)
    batches = {"batch_1": images[0:1], "batch_7": images[10:17]}  # as BATCHES in the test
    np.savez(out_file, **{name: embedder(batch) for name, batch in batches.items()})
    forbidden = ("flax", "jaxes.models", "jaxes.data", "jaxes.instance", "tensorflow_datasets")
    loaded = sorted(m for m in sys.modules if m in forbidden or m.startswith("flax."))
    assert "flax" not in sys.modules and "jaxes.models" not in sys.modules, loaded
    assert not loaded, loaded
    """
)


def start(*args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *map(str, args)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


@pytest.fixture(scope="module")
def cli(smoke_run, tmp_path_factory):
    """Export, embed the test split, and export into a non-empty directory, concurrently."""
    base = tmp_path_factory.mktemp("export")
    occupied = base / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("not ours\n")
    procs = {
        "export": start("-m", "jaxes.export", f"--workdir={smoke_run}", f"--out={base / 'model'}"),
        "embed": start(
            "-m", "jaxes.embed", f"--workdir={smoke_run}", "--split=test", f"--out={base / 'e.npy'}"
        ),
        "occupied": start("-m", "jaxes.export", f"--workdir={smoke_run}", f"--out={occupied}"),
    }
    results = {name: finish(proc) for name, proc in procs.items()}
    for name in ("export", "embed"):
        assert results[name].returncode == 0, results[name].stderr
    return {
        "export_dir": base / "model",
        "embeddings": np.load(base / "e.npy"),
        "occupied": (results["occupied"], occupied),
        "base": base,
    }


def test_export_runs_without_flax_and_matches_embed(cli, digits):
    images_file, out_file = cli["base"] / "test_images.npy", cli["base"] / "served.npz"
    np.save(images_file, digits.test.images)
    proc = finish(start("-c", SERVE, cli["export_dir"], images_file, out_file))
    assert proc.returncode == 0, proc.stderr
    served = np.load(out_file)
    for size, rows in BATCHES.items():
        assert served[f"batch_{size}"].shape == (size, cli["embeddings"].shape[1])
        np.testing.assert_allclose(served[f"batch_{size}"], cli["embeddings"][rows], atol=1e-5)


def test_manifest_describes_the_instance(cli, smoke_run, digits):
    manifest = json.loads((cli["export_dir"] / "manifest.json").read_text())
    summary = workdir.read_summary(smoke_run)
    config = json.loads((smoke_run / workdir.CONFIG).read_text())
    assert manifest["input"]["shape"] == ["b", *digits.spec.shape]
    assert manifest["input"]["dtype"] == "uint8"
    assert manifest["embedding_size"] == cli["embeddings"].shape[1]
    assert manifest["preprocessing"]["inside_model"].endswith(repr(digits.spec.scale))
    assert manifest["metric"]["name"] == config["metric"]
    assert manifest["metric"]["value"] == summary["best_metric"]
    assert manifest["arch"] == summary["best_arch"]
    assert manifest["versions"]["jax"] == jax.__version__
    blob = (cli["export_dir"] / "model.jaxexport").read_bytes()
    exported = jax.export.deserialize(bytearray(blob))
    assert exported.platforms == ("cpu", "cuda")
    assert jax.export.is_symbolic_dim(exported.in_avals[-1].shape[0])


def test_embedder_pads_and_chunks_any_batch(cli, digits):
    """max_batch=4: 11 rows go as 4 + 4 + 3 (padded to 4); 0 rows give an empty result."""
    embedder = serving.load(cli["export_dir"], max_batch=4)
    np.testing.assert_allclose(embedder(digits.test.images[:11]), cli["embeddings"][:11], atol=1e-5)
    assert embedder(digits.test.images[:0]).shape == (0, cli["embeddings"].shape[1])
    with pytest.raises(serving.ServingError, match="uint8"):
        embedder(digits.test.images[:2].astype(np.float32))
    with pytest.raises(serving.ServingError, match="shape"):
        embedder(digits.test.images[:2, :4])


def test_export_into_a_non_empty_directory_exits_2(cli):
    proc, occupied = cli["occupied"]
    assert proc.returncode == 2
    message = proc.stderr.strip()
    assert "\n" not in message and "not an empty directory" in message, message
    assert sorted(p.name for p in occupied.iterdir()) == ["keep.txt"]
    assert not any(p.name.startswith(".occupied.tmp") for p in occupied.parent.iterdir())
