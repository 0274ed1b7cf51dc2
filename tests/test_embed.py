"""``python -m jaxes.embed``: a split, image files of other sizes and modes, and one sentence with
exit 2 for every kind of bad input.

One scenario runs as a real process (the ``-m`` entry point); the others call the same
``main(argv)`` in this process, where a process would add only JAX's start-up.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxes import images, infer, workdir
from tests.test_cli import run_module

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, JAX_PLATFORMS="cpu")
EXACT_SUBSET = 40  # test images for the conversions that must be bit-exact


def start_embed(*args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "jaxes.embed", *map(str, args)]
    return subprocess.Popen(
        cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
    )


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def read_output(out: Path) -> tuple[np.ndarray, dict]:
    return np.load(out), json.loads(out.with_suffix(".json").read_text())


@pytest.fixture(scope="module")
def image_root(tmp_path_factory, digits):
    """Test images as files: 8x8 gray; 32x32 RGB upscaled bilinear and nearest; 16x16 RGBA."""
    root = tmp_path_factory.mktemp("images")
    for sub in ("gray", "rgb_bilinear", "rgb_nearest", "rgba"):
        (root / sub).mkdir()
    for index, image in enumerate(digits.test.images):
        gray = Image.fromarray(image[:, :, 0], mode="L")
        gray.save(root / "gray" / f"{index:04d}.png")
        upscaled = gray.resize((32, 32), Image.Resampling.BILINEAR).convert("RGB")
        upscaled.save(root / "rgb_bilinear" / f"{index:04d}.png")
        if index < EXACT_SUBSET:
            nearest = gray.resize((32, 32), Image.Resampling.NEAREST).convert("RGB")
            nearest.save(root / "rgb_nearest" / f"{index:04d}.png")
            # White strokes whose alpha is the gray value: on black, that is the gray value.
            rgba = np.full((8, 8, 4), 255, np.uint8)
            rgba[:, :, 3] = image[:, :, 0]
            rgba = Image.fromarray(rgba, mode="RGBA").resize((16, 16), Image.Resampling.NEAREST)
            rgba.save(root / "rgba" / f"{index:04d}.png")
    return root


def _write_bad(path: Path, kind: str) -> None:
    if kind == "corrupt":
        full = path.with_suffix(".full")
        Image.new("RGB", (64, 64), (200, 10, 10)).save(full, format="PNG", compress_level=0)
        path.write_bytes(full.read_bytes()[:2000])  # a truncated PNG
        full.unlink()
    elif kind == "not_an_image":
        path.write_text("these are notes, not pixels\n")
    else:  # cmyk: a real image, but with no fixed mapping to gray
        Image.new("CMYK", (8, 8), (0, 0, 0, 255)).save(path, format="JPEG")


BAD = {"corrupt": "b_corrupt.png", "not_an_image": "c_notes.png", "cmyk": "d_cmyk.jpg"}
GOOD = {"a_0.png": 0, "a_1.png": 1, "e_0.png": 2, "e_1.png": 3}  # file -> test image index


def _folder(root: Path, image_root: Path, bad_kinds) -> Path:
    """Four good gray PNGs with the bad files of ``bad_kinds`` sorted between them."""
    root.mkdir()
    for name, index in GOOD.items():
        (root / name).write_bytes((image_root / "gray" / f"{index:04d}.png").read_bytes())
    for kind in bad_kinds:
        _write_bad(root / BAD[kind], kind)
    return root


@pytest.fixture(scope="module")
def cli(smoke_run, image_root, tmp_path_factory):
    """Every command of this module: the ``test`` split as a real process, and meanwhile the
    other scenarios through ``main`` in this process.

    Returns:
      name -> (CompletedProcess, out path, extra), with the name of each scenario.
    """
    base = tmp_path_factory.mktemp("cli")
    unfinished = base / "unfinished"  # a run killed before its first best instance
    (unfinished / "checkpoints").mkdir(parents=True)
    (unfinished / workdir.CONFIG).write_text((smoke_run / workdir.CONFIG).read_text())
    scenarios = {
        "test": (smoke_run, "--split=test"),
        "train": (smoke_run, "--split=train"),
        "files": (smoke_run, f"--images={image_root}/*/*.png"),
        "skip_bad": (
            smoke_run,
            f"--images={_folder(base / 'mixed', image_root, BAD)}",
            "--skip-bad",
        ),
        "empty_glob": (smoke_run, f"--images={base}/nothing/*.png"),
        "unfinished": (unfinished, f"--images={image_root}/gray"),
    }
    for kind in BAD:
        scenarios[kind] = (smoke_run, f"--images={_folder(base / kind, image_root, [kind])}")
    before = sorted(unfinished.rglob("*"))

    def argv(name):
        workdir_path, *args = scenarios[name]
        return f"--workdir={workdir_path}", *args, f"--out={base / name / 'emb.npy'}"

    real = start_embed(*argv("test"))  # meanwhile, the others in this process
    results = {
        name: (run_module("jaxes.embed", *argv(name)), base / name / "emb.npy")
        for name in scenarios
        if name != "test"
    }
    results["test"] = (finish(real), base / "test" / "emb.npy")
    results["unfinished_unchanged"] = sorted(unfinished.rglob("*")) == before
    return results


def output(cli, name: str) -> tuple[np.ndarray, dict]:
    proc, out = cli[name]
    assert proc.returncode == 0, proc.stderr
    return read_output(out)


def rows_of(cli, sub: str) -> np.ndarray:
    """The embeddings of the image files in directory ``sub``, in file order."""
    emb, record = output(cli, "files")
    rows = [i for i, name in enumerate(record["files"]) if Path(name).parent.name == sub]
    return emb[rows]


def test_split_embeddings_reproduce_the_runs_knn(cli, smoke_run, digits):
    (test_emb, test_record), (train_emb, train_record) = output(cli, "test"), output(cli, "train")
    assert test_emb.dtype == np.float32 and test_emb.shape[0] == len(digits.test)
    assert test_record["split"] == "test" and test_record["shape"] == list(test_emb.shape)
    assert test_record["indices"] == list(range(len(digits.test)))
    assert test_record["labels"] == digits.test.labels.tolist()
    knn = infer.knn_top1(train_emb, train_record["labels"], test_emb, test_record["labels"])
    # The same instance on the same data as the run's own kNN: at most a near-tie may flip.
    assert abs(knn - workdir.read_summary(smoke_run)["knn_top1"]) <= 1 / len(digits.test)


def test_files_are_listed_in_sorted_order(cli, image_root):
    emb, record = output(cli, "files")
    expected = sorted(str(p) for p in image_root.glob("*/*.png"))
    assert record["files"] == expected and record["skipped"] == []
    assert emb.shape == (len(expected), output(cli, "test")[0].shape[1])


def test_gray_png_files_match_the_split(cli):
    np.testing.assert_allclose(rows_of(cli, "gray"), output(cli, "test")[0], atol=1e-5)


@pytest.mark.parametrize("sub", ["rgb_nearest", "rgba"])
def test_upscaled_rgb_and_rgba_files_map_back_exactly(cli, sub):
    """Nearest upscaling then area downscaling, and alpha on black, recover the pixels."""
    expected = output(cli, "test")[0][:EXACT_SUBSET]
    np.testing.assert_allclose(rows_of(cli, sub), expected, atol=1e-5)


def test_bilinear_rgb_files_map_back_to_their_area_average_luma(image_root, digits):
    """The conversion of 32x32 RGB files equals an independent numpy one: ITU-R 601 luma, then
    the mean of each 4x4 block, to within one gray level (Pillow rounds in fixed point)."""
    paths = sorted((image_root / "rgb_bilinear").glob("*.png"))[:EXACT_SUBSET]
    converted, _, _ = images.read_all(paths, digits.spec, skip_bad=False)
    rgb = np.stack([np.asarray(Image.open(p), np.float64) for p in paths])
    luma = rgb @ np.array([0.299, 0.587, 0.114])
    expected = luma.reshape(len(paths), 8, 4, 8, 4, 1).mean(axis=(2, 4))
    assert np.abs(converted - expected).max() <= 1.0


def test_bilinear_rgb_files_keep_the_knn_accuracy(cli, smoke_run, digits):
    """Bilinear 8->32 then area 32->8 blurs each digit (mean |change| ~18/255), so exact equality
    is not expected: the smoke model's kNN top-1 drops from 0.958 to 0.922 on them (measured).
    A wrong conversion falls far lower (measured: inverted 0.03, transposed 0.09, upscaled but
    cropped instead of resized 0.11, alpha on white 0.10), so within 0.05 of the run's own kNN
    top-1 separates the two."""
    train_emb, train_record = output(cli, "train")
    files_emb = rows_of(cli, "rgb_bilinear")
    knn = infer.knn_top1(train_emb, train_record["labels"], files_emb, digits.test.labels)
    assert knn >= workdir.read_summary(smoke_run)["knn_top1"] - 0.05


def assert_one_sentence_exit_2(cli, name: str, *needles: str) -> None:
    proc, out = cli[name]
    assert proc.returncode == 2, proc.stderr
    message = proc.stderr.strip()
    assert "\n" not in message and message.startswith("jaxes: ") and message.endswith("."), message
    for needle in needles:
        assert needle in message
    assert not out.exists() and not out.with_suffix(".json").exists()


@pytest.mark.parametrize(
    "kind, needles",
    [("corrupt", ()), ("not_an_image", ("not an image",)), ("cmyk", ("CMYK", "1-channel"))],
)
def test_a_bad_file_exits_2_naming_it(cli, kind, needles):
    folder = cli[kind][1].parent.parent / kind
    assert_one_sentence_exit_2(cli, kind, str(folder / BAD[kind]), *needles)


def test_skip_bad_goes_on_and_lists_the_skipped(cli):
    emb, record = output(cli, "skip_bad")
    folder = Path(record["files"][0]).parent
    assert [Path(f).name for f in record["files"]] == list(GOOD)
    assert [s["file"] for s in record["skipped"]] == [str(folder / n) for n in BAD.values()]
    assert all(s["reason"] for s in record["skipped"])
    np.testing.assert_allclose(emb, output(cli, "test")[0][list(GOOD.values())], atol=1e-5)


def test_empty_glob_exits_2(cli):
    assert_one_sentence_exit_2(cli, "empty_glob", "matches no files")


def test_unfinished_workdir_exits_2_and_writes_nothing(cli):
    assert_one_sentence_exit_2(cli, "unfinished", "no finished best instance")
    assert cli["unfinished_unchanged"]


def gray_palette(image: Image.Image) -> Image.Image:
    image.putpalette([value for index in range(256) for value in (index, index, index)])
    return image


@pytest.mark.parametrize(
    "make, channels, expected",
    [
        # 16-bit gray: 0..65535 scales to 0..255 (Pillow alone would clip at 255).
        (lambda g: Image.fromarray(g.astype(np.uint16) * 257), 1, lambda g: g),
        # Gray with alpha, on black: value * alpha / 255.
        (
            lambda g: Image.fromarray(np.stack([np.full_like(g, 200), g], -1), mode="LA"),
            1,
            lambda g: (200 * g.astype(int) + 127) // 255,
        ),
        # Palette: the colours it indexes.
        (lambda g: gray_palette(Image.fromarray(g, mode="P")), 1, lambda g: g),
        # Gray to RGB repeats the value.
        (lambda g: Image.fromarray(g), 3, lambda g: np.repeat(g[..., None], 3, -1)),
    ],
)
def test_modes_convert_to_the_spec(digits, make, channels, expected):
    gray = digits.test.images[7, :, :, 0]
    spec = dataclasses.replace(digits.spec, channels=channels)
    converted = images.to_spec(make(gray), spec).astype(int)
    assert np.abs(converted - expected(gray).reshape(converted.shape)).max() <= 1


@pytest.mark.parametrize(
    "mode, channels, needles",
    [
        ("F", 1, ("photo.tif", "mode F", "1-channel")),
        ("CMYK", 3, ("photo.tif", "mode CMYK", "3-channel")),
        ("RGB", 2, ("2 channels",)),
    ],
)
def test_unmappable_channels_name_both(digits, mode, channels, needles):
    spec = dataclasses.replace(digits.spec, channels=channels)
    with pytest.raises(images.ChannelError) as error:
        images.to_spec(Image.new(mode, (8, 8)), spec, "photo.tif")
    assert all(needle in str(error.value) for needle in needles), error.value


def test_a_directory_that_is_no_run_is_named(tmp_path):
    with pytest.raises(workdir.WorkdirError, match=r"has no config\.json.*python -m jaxes\.main"):
        workdir.read_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(workdir.WorkdirError, match="not valid JSON"):
        workdir.read_config(tmp_path)
