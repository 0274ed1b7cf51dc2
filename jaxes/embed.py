"""Command line: feature vectors of images from a run's best instance.

    python -m jaxes.embed --workdir=runs/digits --images='photos/*.png' --out=emb.npy
    python -m jaxes.embed --workdir=runs/digits --split=test --out=emb.npy --plots

Writes ``emb.npy``, an (N, D) float32 array, and ``emb.json`` beside it: the file (or split
record) of each row, in order, and the files skipped by ``--skip-bad`` with the reason. The best
instance is restored onto the devices present (a GPU-trained run embeds on a CPU), and images are
converted to the run's input spec as ``jaxes.images`` describes. Batches have a fixed size,
padded, so one compiled function serves any N. ``--plots`` also writes ``neighbors.png`` and
``embedding.png`` beside ``--out`` (``jaxes.vis``), against the run's train split: files of unknown
class get no green/red frames, and are coloured by their nearest train image's class.

Exit codes: 0 done, 2 bad input (one sentence on stderr; nothing is written).
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxes import checkpoint, cli, files, infer, instance, sharding, vis
from jaxes import data as data_lib
from jaxes import images as images_lib
from jaxes import workdir as workdir_lib

DEFAULT_BATCH_SIZE = 256


class EmbedError(ValueError):
    """The command line asks for something that cannot be embedded."""


USER_ERRORS = (
    EmbedError,
    workdir_lib.WorkdirError,
    images_lib.ImageError,
    images_lib.ChannelError,
    checkpoint.CheckpointError,
    data_lib.DataError,
)


def embed_images(model, spec: data_lib.InputSpec, images, batch_size: int = DEFAULT_BATCH_SIZE):
    """Embeds uint8 images (N, H, W, C) with ``model`` on every local device.

    Args:
      model: the restored instance (``instance.load``).
      spec: its input spec; ``images`` must have its shape.
      images: uint8 array (N, H, W, C).
      batch_size: rows per compiled call (rounded up to a multiple of the device count).

    Returns:
      float32 array (N, embed_dim).
    """
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.shape[1:] != spec.shape:
        raise EmbedError(
            f"images must be uint8 of shape (N, {', '.join(map(str, spec.shape))}), "
            f"got {images.dtype} {images.shape}."
        )
    mesh = sharding.make_mesh(jax.local_devices())
    graphdef, state = nnx.split(model)
    state = sharding.put_tree(state, sharding.replicated(mesh))
    evaluator = infer.Evaluator(graphdef, spec, mesh, batch_size)
    return evaluator.embed(state, images)


def _write_outputs(out: Path, embeddings: np.ndarray, record: dict) -> Path:
    """Writes out (.npy) and its .json atomically; returns the .json path."""
    out.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.save(buffer, embeddings.astype(np.float32), allow_pickle=False)
    # The rows' record first, the array last: a new .npy always has its .json beside it.
    record_path = out.with_suffix(".json")
    record_bytes = (json.dumps(record, indent=2) + "\n").encode("utf-8")
    files.atomic_write_files((record_path, record_bytes), (out, buffer.getvalue()))
    return record_path


def _check_out(out: str) -> Path:
    path = Path(out).expanduser()
    if path.suffix != ".npy":
        raise EmbedError(f"--out={out} must end in .npy (the row record goes beside it as .json).")
    if path.is_dir():
        raise EmbedError(f"--out={out} is a directory; give a file name ending in .npy.")
    return path


def embed(
    workdir: str,
    out: str,
    *,
    images: str | None = None,
    split: str | None = None,
    skip_bad: bool = False,
    data_dir: str | None = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    plots: bool = False,
) -> dict:
    """Embeds image files (``images``) or a split of the run's data set (``split``).

    Args:
      workdir: the run whose best instance embeds.
      out: the .npy file to write; the row record goes to the same path with .json.
      images: a file, directory or glob (see ``images.expand``); exclusive with ``split``.
      split: train, validation or test of the run's data set.
      skip_bad: skip unreadable images (listed in the record) instead of failing.
      data_dir: the TFDS data dir for ``split``; default: the run's, else the default one.
      batch_size: rows per compiled call.
      plots: also write neighbors.png and embedding.png beside ``out``.

    Returns:
      The row record written to the .json file.

    Raises:
      EmbedError, images.ImageError, images.ChannelError, checkpoint.CheckpointError,
      data.DataError: bad input, named in one sentence; nothing is written.
    """
    if (images is None) == (split is None):
        raise EmbedError("give exactly one of --images=PATH_OR_GLOB and --split=NAME.")
    if batch_size < 1:
        raise EmbedError(f"--batch_size must be >= 1, got {batch_size}.")
    out_path = _check_out(out)
    if images is not None:
        paths = images_lib.expand(images)
        if not paths:
            raise EmbedError(
                f"--images={images} matches no files; give an image file, a directory of "
                "images, or a glob such as 'photos/*.png'."
            )
    elif split not in data_lib.SPLITS:
        raise EmbedError(f"--split={split} is not a split; use one of {data_lib.SPLITS}.")
    if split is not None or plots:
        config = workdir_lib.read_config(workdir)
        data_dir = data_dir or config["data_dir"] or data_lib.default_data_dir()
    model, meta = instance.load(workdir)
    spec = meta.spec
    record = {"workdir": str(workdir), "round_index": meta.round_index, "arch": meta.arch}
    if images is not None:
        batch, kept, skipped = images_lib.read_all(paths, spec, skip_bad=skip_bad)
        if not kept:
            raise EmbedError(
                f"none of the {len(paths)} files matched by --images={images} could be read as "
                "an image; emb.json would be empty, so nothing was written."
            )
        record.update(source="images", images=images, files=kept, skipped=skipped)
    if split is not None or plots:
        loaded = data_lib.load_config(config, data_dir)
        if loaded.spec.shape != spec.shape:
            raise EmbedError(
                f"{config['dataset']} in {data_dir} has images of shape {loaded.spec.shape}, but "
                f"the run was trained on {spec.shape}; pass the run's --data_dir."
            )
    if split is not None:
        batch = loaded.split(split).images
        record.update(
            source="split",
            dataset=config["dataset"],
            split=split,
            indices=list(range(len(batch))),
            labels=loaded.split(split).labels.tolist(),
        )
    start = time.perf_counter()
    embeddings = embed_images(model, spec, batch, batch_size)
    seconds = time.perf_counter() - start
    record.update(shape=list(embeddings.shape), dtype="float32", input_spec=spec.to_dict())
    if plots:
        record["plots"] = [str(p) for p in _plots(out_path, model, spec, loaded, batch, embeddings,
                                                  record.get("labels"), batch_size)]  # fmt: skip
    record_path = _write_outputs(out_path, embeddings, record)
    skipped = f"; skipped {len(record['skipped'])} bad files" if record.get("skipped") else ""
    print(
        f"embedded {len(embeddings)} images -> {out_path} {embeddings.shape} float32 and "
        f"{record_path} in {seconds:.2f} s with compilation{skipped}"
    )
    return record


def _plots(out_path, model, spec, loaded, images, embeddings, labels, batch_size):
    """neighbors.png and embedding.png of the embedded rows against the run's train split."""
    train = loaded.train
    train_emb = embed_images(model, spec, train.images, batch_size)
    names = tuple(loaded.class_names)
    paths = [out_path.parent / files.NEIGHBORS, out_path.parent / files.EMBEDDING]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    vis.plot_neighbors(paths[0], images, labels, train.images, train.labels, embeddings,
                       train_emb, names)  # fmt: skip
    if labels is None:  # files of unknown class: coloured by their nearest train image's class
        colour_by = train.labels[infer.nearest(train_emb, embeddings, 1)[:, 0]]
        title = f"{len(embeddings)} embedded files in 2-D, coloured by the nearest train class"
    else:
        colour_by, title = np.asarray(labels), ""
    vis.plot_embedding(paths[1], embeddings, colour_by, names, title=title)
    return paths


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit code."""
    parser = cli.Parser(prog="python -m jaxes.embed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a run of `python -m jaxes.main`")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="image file, directory, or glob ('**' recurses)")
    source.add_argument("--split", choices=data_lib.SPLITS, help="a split of the run's data set")
    parser.add_argument("--out", required=True, help="output .npy; the row record goes to .json")
    parser.add_argument("--skip_bad", "--skip-bad", action="store_true", help="skip bad images")
    parser.add_argument("--data_dir", help="TFDS data dir for --split (default: the run's)")
    parser.add_argument("--batch_size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--plots", action="store_true", help="write neighbors/embedding.png")
    args = parser.parse_args(argv)
    try:
        embed(
            args.workdir,
            args.out,
            images=args.images,
            split=args.split,
            skip_bad=args.skip_bad,
            data_dir=args.data_dir,
            batch_size=args.batch_size,
            plots=args.plots,
        )
    except USER_ERRORS as error:
        cli.fail(str(error))
    except OSError as error:
        cli.fail(cli.describe_os_error(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
