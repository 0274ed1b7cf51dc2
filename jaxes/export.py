"""Command line: a portable feature extractor from a run's best instance.

    python -m jaxes.export --workdir=runs/digits --out=exported/digits

writes three things into ``--out`` (a new or empty directory; it appears whole or not at all):

    model.jaxexport   serialized ``jax.export`` of ``embed(params, images)`` for cpu and cuda,
                      images uint8 (b, H, W, C) with a symbolic batch b, output float32 (b, D);
                      ``float32(images) * scale`` happens inside
    params/           the instance's state as a nested dict of arrays (Orbax StandardCheckpointer)
    manifest.json     input shape and dtype, preprocessing, embedding size, metric, versions,
                      arch, and the params tree (``float32[64,32]`` per leaf) to restore it

``jaxes.serving`` runs it with jax, orbax and numpy alone: no Flax, no jaxes model code.

Exit codes: 0 done, 2 bad input (one sentence on stderr; nothing is written).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

import jaxes
from jaxes import checkpoint, cli, instance, models, pytree
from jaxes import data as data_lib
from jaxes import workdir as workdir_lib
from jaxes.serving import FORMAT, MANIFEST_FILE, MODEL_FILE  # the loader's names, one source

PARAMS_DIR = "params"
PLATFORMS = ("cpu", "cuda")


class ExportError(ValueError):
    """The export cannot be written where it was asked to go."""


def tree_layout(params) -> dict:
    """The params tree with each leaf written as ``dtype[d0,d1,...]`` (what serving restores)."""
    return jax.tree.map(
        lambda leaf: f"{np.dtype(leaf.dtype).name}[{','.join(map(str, leaf.shape))}]", params
    )


def export_model(model, spec: data_lib.InputSpec, platforms=PLATFORMS):
    """Exports ``embed(params, images)`` of ``model`` with a symbolic batch dimension.

    Args:
      model: the restored instance.
      spec: its input spec (shape of the uint8 images, scale applied inside).
      platforms: the platforms to lower for, all in one artifact.

    Returns:
      ``(exported, params)``: the ``jax.export.Exported`` and the params (nested dict with str
      keys) that it takes as its first argument.
    """
    graphdef, state = nnx.split(model)
    original = nnx.to_pure_dict(state)
    shape = pytree.structure(original)
    params = pytree.with_str_keys(original)

    def embed_fn(params, images):
        filled = jax.tree.map(lambda leaf: leaf, state)  # a fresh State for this trace to fill
        nnx.replace_by_pure_dict(filled, pytree.rebuild(shape, params))
        return nnx.merge(graphdef, filled).embed(data_lib.normalize(images, spec))

    height, width, channels = spec.shape
    images_spec = jax.ShapeDtypeStruct(
        jax.export.symbolic_shape(f"b, {height}, {width}, {channels}"), jnp.uint8
    )
    params_spec = jax.tree.map(lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype), params)
    exported = jax.export.export(jax.jit(embed_fn), platforms=platforms)(params_spec, images_spec)
    return exported, params


def manifest(workdir, meta: instance.Meta, exported, params) -> dict:
    """The manifest.json content of an export (see the module doc)."""
    spec = meta.spec
    summary = workdir_lib.read_summary(workdir) or {}
    target = {1: "L (8-bit gray)", 3: "RGB"}.get(spec.channels, f"{spec.channels} channels")
    return {
        "format": FORMAT,
        "function": "embed(params, images) -> embeddings",
        "platforms": list(exported.platforms),
        "input": {"shape": ["b", *spec.shape], "dtype": "uint8", "layout": "NHWC"},
        "output": {"shape": ["b", exported.out_avals[0].shape[1]], "dtype": "float32"},
        "embedding_size": int(exported.out_avals[0].shape[1]),
        "preprocessing": {
            "inside_model": f"float32(images) * scale, scale = {spec.scale!r}",
            "size": [spec.height, spec.width],
            "resize": "stretch to (width, height): BOX (area) when shrinking both sides, "
            "else BICUBIC; no resampling when the size already matches",
            "channels": f"to {target}; RGB to gray by ITU-R 601-2 luma, gray to RGB by copy",
            "alpha": "composited on black",
            "reference": "jaxes/images.py",
        },
        "input_spec": spec.to_dict(),
        "metric": {
            "name": meta.metric,
            "value": meta.value,
            "round_index": meta.round_index,
        },
        "test": {key: summary[key] for key in ("test_accuracy", "knn_top1") if key in summary},
        "arch": meta.arch,
        "dataset": meta.dataset,
        "class_names": meta.class_names,  # label i is class_names[i]
        "params": {
            "path": PARAMS_DIR,
            "format": "orbax StandardCheckpointer",
            "tree": tree_layout(params),
        },
        "versions": {
            "jax": jax.__version__,
            "orbax-checkpoint": ocp.__version__,
            "jaxes": jaxes.__version__,
            "calling_convention": exported.calling_convention_version,
        },
    }


def _check_out(out: Path) -> None:
    if out.exists() and not (out.is_dir() and not any(out.iterdir())):
        raise ExportError(
            f"--out={out} already exists and is not an empty directory; choose a new one."
        )


def export(workdir: str | os.PathLike, out: str | os.PathLike) -> dict:
    """Exports the best instance of ``workdir`` into the directory ``out``.

    Returns:
      The manifest written to ``out/manifest.json``.

    Raises:
      ExportError, checkpoint.CheckpointError: bad input; nothing is written.
    """
    out = Path(out).expanduser().absolute()
    _check_out(out)
    model, meta = instance.load(workdir)
    exported, params = export_model(model, meta.spec)
    content = manifest(workdir, meta, exported, params)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        (staging / MODEL_FILE).write_bytes(exported.serialize())
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(staging / PARAMS_DIR, params)
        (staging / MANIFEST_FILE).write_text(json.dumps(content, indent=2) + "\n")
        _check_out(out)  # again: another process may have written there meanwhile
        if out.exists():
            out.rmdir()
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return content


def main(argv: list[str] | None = None) -> int:
    """Runs the command line; returns the exit code."""
    parser = cli.Parser(prog="python -m jaxes.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="a run of `python -m jaxes.main`")
    parser.add_argument("--out", required=True, help="a new or empty directory")
    args = parser.parse_args(argv)
    try:
        content = export(args.workdir, args.out)
    except (ExportError, checkpoint.CheckpointError) as error:
        cli.fail(str(error))
    except OSError as error:
        cli.fail(cli.describe_os_error(error))
    size = (Path(args.out) / MODEL_FILE).stat().st_size
    print(
        f"exported {models.Arch.from_dict(content['arch']).short()} ({content['metric']['name']} "
        f"{content['metric']['value']}) to {args.out}: {MODEL_FILE} {size} bytes for "
        f"{'+'.join(content['platforms'])}, input {content['input']['shape']} uint8, "
        f"output (b, {content['embedding_size']}) float32."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
