"""Tests for jaxes.data: the digits TFDS builder, loading without TensorFlow, and errors."""

import json
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow_datasets as tfds
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from sklearn.datasets import load_digits

from jaxes import data
from tests.test_cli import run_module

FRACTIONS = {"train": 0.6, "validation": 0.2, "test": 0.2}


@pytest.fixture(scope="module")
def digits_dir(digits_data_dir):
    """The session's prepared digits dir (tests/conftest.py)."""
    return digits_data_dir


def _record_indices(data_dir):
    """The `index` feature of every record, per split, read by name through tfds.data_source."""
    sources = tfds.data_source("jaxes_digits", data_dir=data_dir)
    return {key: np.array([ex["index"] for ex in sources[key]]) for key in data.SPLITS}


def _run_python(code, timeout=120):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_digits_shapes_dtypes_and_spec(digits):
    assert digits.spec == data.InputSpec(height=8, width=8, channels=1, num_classes=10)
    for key in data.SPLITS:
        split = digits.split(key)
        assert split.images.dtype == np.uint8 and split.labels.dtype == np.int32
        assert split.images.shape == (len(split), 8, 8, 1)
        assert set(np.unique(split.labels)) == set(range(10))
        assert data.nbytes(split) == split.images.size + 4 * len(split)
    all_images = np.concatenate([digits.split(key).images for key in data.SPLITS])
    assert all_images.min() == 0 and all_images.max() == 255


def test_digits_records_match_sklearn_in_index_order(digits, digits_dir):
    source = load_digits()
    expected_images = np.floor(source.images * 255.0 / 16.0 + 0.5).astype(np.uint8)[..., None]
    for key, indices in _record_indices(digits_dir).items():
        assert np.all(np.diff(indices) > 0), f"{key} records are not in source order"
        np.testing.assert_array_equal(digits.split(key).images, expected_images[indices])
        np.testing.assert_array_equal(digits.split(key).labels, source.target[indices])


def test_digits_splits_are_disjoint_and_cover_all(digits_dir):
    indices = _record_indices(digits_dir)
    combined = np.concatenate(list(indices.values()))
    assert len(combined) == len(np.unique(combined)) == len(load_digits().target)


def test_digits_split_sizes_and_stratification(digits):
    labels = load_digits().target
    total = len(labels)
    for key, fraction in FRACTIONS.items():
        split_labels = digits.split(key).labels
        assert abs(len(split_labels) - fraction * total) <= 1
        for label in range(10):
            in_class = np.sum(labels == label)
            assert abs(np.sum(split_labels == label) - fraction * in_class) <= 1, (key, label)


def test_load_twice_is_identical(digits, digits_dir):
    again = data.load("digits", digits_dir)
    assert again.spec == digits.spec
    for key in data.SPLITS:
        np.testing.assert_array_equal(again.split(key).images, digits.split(key).images)
        np.testing.assert_array_equal(again.split(key).labels, digits.split(key).labels)


def test_concurrent_prepare_in_fresh_dir_is_safe_identical_and_tensorflow_free(digits, tmp_path):
    """Two processes prepare one empty dir at once; both succeed, equal to the fixture's data."""
    data_dir = tmp_path / "shared"
    code = """
        import os, sys, time
        import numpy as np
        from jaxes import data
        data_dir, out, me, other = sys.argv[1:]
        open(me, "w").close()
        deadline = time.time() + 60
        while not os.path.exists(other) and time.time() < deadline:  # start together
            time.sleep(0.01)
        loaded = data.load("digits", data_dir)
        assert "tensorflow" not in sys.modules, "preparing digits imported tensorflow"
        arrays = {f"{k}_{f}": getattr(loaded.split(k), f) for k in data.SPLITS
                  for f in ("images", "labels")}
        np.savez(out, **arrays)
    """
    ready = [tmp_path / f"ready{i}" for i in range(2)]
    outs = [tmp_path / f"out{i}.npz" for i in range(2)]
    processes = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                textwrap.dedent(code),
                str(data_dir),
                str(outs[i]),
                str(ready[i]),
                str(ready[1 - i]),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for process in processes:
        _, stderr = process.communicate(timeout=180)
        assert process.returncode == 0, stderr[-3000:]
    for out in outs:
        with np.load(out) as arrays:
            for key in data.SPLITS:
                np.testing.assert_array_equal(arrays[f"{key}_images"], digits.split(key).images)
                np.testing.assert_array_equal(arrays[f"{key}_labels"], digits.split(key).labels)


def test_loading_digits_never_imports_tensorflow(digits_dir):
    result = _run_python(
        f"""
        import sys
        from jaxes import data
        data.load("digits", {str(digits_dir)!r})
        print("tensorflow" in sys.modules)
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "False"


def test_input_spec_json_round_trip_and_validation():
    spec = data.InputSpec(height=28, width=28, channels=1, num_classes=10, scale=1.0 / 3.0)
    assert data.InputSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with pytest.raises(ValueError, match="height"):
        data.InputSpec(height=0, width=8, channels=1, num_classes=10)
    with pytest.raises(ValueError, match="scale"):
        data.InputSpec(height=8, width=8, channels=1, num_classes=10, scale=float("nan"))
    with pytest.raises(ValueError, match="unknown keys"):
        data.InputSpec.from_dict({**spec.to_dict(), "colour": 1})


@given(
    st.integers(1, 4096),
    st.integers(1, 4096),
    st.integers(1, 16),
    st.integers(1, 100_000),
    st.floats(min_value=1e-30, max_value=1e30, allow_nan=False),
)
def test_input_spec_json_round_trip_is_exact(height, width, channels, num_classes, scale):
    spec = data.InputSpec(height, width, channels, num_classes, scale=scale)
    assert data.InputSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_normalize_numpy_and_jax(digits):
    import jax.numpy as jnp

    images = digits.train.images
    for array in (images, jnp.asarray(images)):
        model_input = np.asarray(data.normalize(array, digits.spec))
        assert model_input.dtype == np.float32 and model_input.shape == images.shape
        assert model_input.min() == 0.0 and model_input.max() == 1.0
        np.testing.assert_allclose(model_input, images / 255.0, rtol=1e-6)


def test_split_by_name(digits):
    assert digits.split("validation") is digits.validation
    with pytest.raises(ValueError, match="Unknown split"):
        digits.split("valid")


def test_unknown_dataset_says_how_to_prepare(tmp_path):
    with pytest.raises(data.DataError, match=re.escape("python -m jaxes.data prepare")) as error:
        data.load("no_such_dataset_xyz", tmp_path)
    assert "Unknown dataset" in str(error.value)


def test_unprepared_tfds_dataset_says_how_to_prepare(tmp_path):
    hint = re.escape("python -m jaxes.data prepare mnist")
    with pytest.raises(data.DataError, match=hint) as error:
        data.load("mnist", tmp_path)
    assert "not prepared" in str(error.value)


def test_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("JAXES_DATA_DIR", str(tmp_path))
    assert data.default_data_dir() == str(tmp_path)
    monkeypatch.delenv("JAXES_DATA_DIR")
    assert data.default_data_dir().endswith("jaxes/tensorflow_datasets")


class TinyRgb(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A stand-in for mnist/cifar10: PNG Image feature, ClassLabel, and no validation split."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None  # see jaxes.digits.JaxesDigits.code_path

    def _info(self):
        features = {
            "image": tfds.features.Image(shape=(4, 5, 3)),
            "label": tfds.features.ClassLabel(num_classes=3),
        }
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict(features), disable_shuffling=True
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(0, 50), "test": self._generate_examples(50, 60)}

    def _generate_examples(self, start, stop):
        for index in range(start, stop):
            # PIL encodes the PNG; a numpy array would need TensorFlow.
            yield index, {"image": Image.fromarray(tiny_image(index)), "label": index % 3}


def tiny_image(index):
    return np.random.default_rng(index).integers(0, 256, (4, 5, 3), dtype=np.uint8)


def test_other_tfds_dataset_loads_by_name_with_carved_validation(tmp_path):
    TinyRgb(data_dir=tmp_path, file_format="array_record").download_and_prepare()
    loaded = data.load("tiny_rgb", tmp_path)
    assert loaded.spec == data.InputSpec(height=4, width=5, channels=3, num_classes=3)
    assert (len(loaded.train), len(loaded.validation), len(loaded.test)) == (45, 5, 10)
    # Validation is a subset of the prepared train split, disjoint from what stays in train.
    train_ids = {tiny_image(i).tobytes(): i for i in range(50)}
    kept = [train_ids[image.tobytes()] for image in loaded.train.images]
    carved = [train_ids[image.tobytes()] for image in loaded.validation.images]
    assert sorted(kept + carved) == list(range(50))
    assert kept == sorted(kept) and carved == sorted(carved)  # record order is kept
    np.testing.assert_array_equal(loaded.validation.labels, np.array(carved) % 3)
    expected_test = np.stack([tiny_image(i) for i in range(50, 60)])
    np.testing.assert_array_equal(loaded.test.images, expected_test)
    again = data.load("tiny_rgb", tmp_path)
    np.testing.assert_array_equal(again.validation.images, loaded.validation.images)


def test_cli_prepares_digits_and_reports_failures(digits_dir, tmp_path):
    ok = subprocess.run(
        [sys.executable, "-m", "jaxes.data", "prepare", "digits", f"--data_dir={digits_dir}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "Prepared 'digits'" in ok.stdout
    # The failure through the same main in this process (a process adds only the start-up).
    failed = run_module("jaxes.data", "prepare", "no_such_dataset_xyz", f"--data_dir={tmp_path}")
    assert failed.returncode == 2
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 1 and "no_such_dataset_xyz" in lines[0], failed.stderr
