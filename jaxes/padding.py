"""Size buckets: architectures that differ only in widths (and depth) share one program.

See docs/design.md §6b.

An instance of ``arch`` is trained as an instance of its *bucket*, the same architecture with
``width`` and ``embed_dim`` raised to the bucket's sizes, and a 0/1 *mask* per parameter that
keeps the padding at zero. With the padded kernel rows and columns and the padded biases at zero,
a padded unit's pre-activation is 0, GELU(0) = 0 and dropout keeps 0, so every padded unit outputs
0, receives a zero gradient and passes none on: the real units compute exactly the function of the
unpadded architecture (up to the order of float additions). The masks are applied after every
update anyway, so nothing (weight decay, a non-finite step) can move the padding.

Per-block widths (``Arch.width_growth``) pad block by block: block ``i`` of an instance has
``arch.widths[i]`` real units of the bucket's ``bucket.widths[i]``. A residual skip adds zeros to
zeros on the padding (an identity skip) or is a dense layer padded like the others (a
projection). A normalized architecture (``norm != "none"``) does not pad its block widths: its
mean and variance over a block's units would count the padded zeros and change the function,
and masking them would need each instance's real width inside the model call, which the
population program does not pass (it passes parameters only); its ``embed_dim`` still pads,
since the embedding and head are not normalized.

The real sizes are traced arguments (``RealSizes``), so one program serves every size in its
bucket. ``init`` draws each kernel's real part from ``lecun_normal`` on the *real* fan-in, so the
real units start from exactly the distribution of the unpadded init.

*Depth* pads too (``skips_blocks``), for a backbone in ``depth_backbones`` whose blocks all have
one width (``width_growth`` 1, no normalization) and, for a CNN, where no block after the first
pools (the 8x8 digits pool once; by the default schedule, 28x28 and 32x32 images pool again, so
their CNNs keep their depths): its bucket has the space's largest depth, and a block beyond an
instance's depth is masked to zero whole, which ``gates`` reads back from the mask (a block is in
the instance iff its first bias unit is real). The model runs such a block under ``lax.cond`` on
its gate (``models.Model.embed``): a skipped block passes its input on unchanged, and its
parameters get a zero gradient. Every block after the first maps the bucket's width to itself at
one resolution, so the embedding reads the last real block's output, whatever the depth. A
program of one instance (every CPU run of one device, README "Population rounds") then spends no
compute on a skipped block's forward and backward pass (its parameters still get their optimizer
step, on zeros); a ``vmap``ped group computes both branches of the ``cond`` and selects, so there
a shallow instance costs what the bucket's deepest does.

``unpad`` cuts a trained padded instance back to its own architecture; that is what is saved,
embedded and exported.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxes import models

# Which backbones pad their block widths by default. MLPs on small inputs are overhead-bound, so
# a wider matmul costs almost nothing and a shared program saves a compile. A CNN's cost grows
# with width squared (benchmarks/README.md), so its blocks keep their own width; its embedding
# layer (a dense layer) still pads.
DEFAULT_PAD_BACKBONES = ("mlp",)
# Which backbones pad their depth by default (where their blocks allow, ``skips_blocks``). An
# MLP's skipped block costs nothing measurable (an MLP of one 128-wide block: 2.3 ms per digits
# epoch in a bucket of two, 2.4 ms in its own), so a space's MLPs that differ only in sizes share
# one program. A CNN's is not free: on a 2-core CPU a CNN of one 128-wide block trained in a
# bucket of two at 0.049-0.064 s per epoch, against 0.041-0.042 s in its own, so a search saves
# compiles and pays some of it back in training (README "Population rounds"); ("mlp", "cnn")
# turns it on.
DEFAULT_DEPTH_BACKBONES = ("mlp",)


@dataclasses.dataclass(frozen=True)
class RealSizes:
    """The traced sizes of one instance inside its bucket: its block widths and embedding size.

    Attributes:
      widths: (depth,) int32, the real width of each block (``Arch.widths``).
      embed_dim: () int32, the real embedding size.
    """

    widths: jax.Array
    embed_dim: jax.Array

    @classmethod
    def one(cls, arch: models.Arch, depth: int | None = None) -> RealSizes:
        """The sizes of one instance (no instance axis) in a bucket of ``depth`` blocks (default:
        its own); a block beyond its depth has width 0."""
        return cls(_widths(arch, depth), np.asarray(arch.embed_dim, np.int32))

    @classmethod
    def of(cls, archs: Sequence[models.Arch], depth: int | None = None) -> RealSizes:
        """The stacked sizes of ``archs`` (a leading instance axis) in a bucket of ``depth``
        blocks (default: the deepest of ``archs``)."""
        depth = max(a.depth for a in archs) if depth is None else depth
        return cls(
            widths=np.stack([_widths(a, depth) for a in archs]),
            embed_dim=np.asarray([a.embed_dim for a in archs], np.int32),
        )


def _widths(arch: models.Arch, depth: int | None) -> np.ndarray:
    depth = arch.depth if depth is None else depth
    if depth < arch.depth:
        raise ValueError(f"a bucket of depth {depth} cannot hold {arch.short()}.")
    return np.asarray([*arch.widths, *(0,) * (depth - arch.depth)], np.int32)


jax.tree_util.register_dataclass(RealSizes, data_fields=["widths", "embed_dim"], meta_fields=[])


def _ints(space: Mapping[str, Sequence], field: str) -> list[int]:
    return [v for v in space.get(field, ()) if isinstance(v, int) and not isinstance(v, bool)]


def bucket(
    arch: models.Arch,
    space: Mapping[str, Sequence],
    pad_backbones: Sequence[str] = DEFAULT_PAD_BACKBONES,
    depth_backbones: Sequence[str] = (),
    input_shape: Sequence[int] | None = None,
) -> models.Arch:
    """The bucket of ``arch``: its width, embedding size and depth raised to the largest in
    ``space`` (the width for ``pad_backbones``, the depth where ``skips_blocks``).

    Every other field (growth, norm, residual, ...) stays: it shapes the program.

    Args:
      arch: the architecture.
      space: the search space (field -> values); a field it does not list keeps its value.
      pad_backbones: the backbones whose block widths pad; every backbone pads ``embed_dim``.
        A normalized architecture never pads its block widths (module docstring).
      depth_backbones: the backbones whose depth pads (``skips_blocks``).
      input_shape: the images' (height, width, channels): where a CNN pools.
    """

    def top(field, value):
        return max([value, *_ints(space, field)])

    pads = arch.backbone in pad_backbones and arch.norm == "none"
    width = top("width", arch.width) if pads else arch.width
    skips = skips_blocks(arch, space, depth_backbones, input_shape)
    depth = top("depth", arch.depth) if skips else arch.depth
    return dataclasses.replace(
        arch, depth=depth, width=width, embed_dim=top("embed_dim", arch.embed_dim)
    )


def skips_blocks(
    arch: models.Arch,
    space: Mapping[str, Sequence],
    depth_backbones: Sequence[str],
    input_shape: Sequence[int] | None,
) -> bool:
    """Whether ``arch``'s bucket has the space's largest depth and skips the blocks beyond an
    instance's own (module docstring): ``arch`` is a backbone of ``depth_backbones`` whose
    blocks all have one width and no normalization, the space lists a depth below the largest,
    and (a CNN) no block after the first pools at the largest depth. True for the bucket too."""
    if arch.backbone not in depth_backbones or arch.backbone not in models.BACKBONES:
        return False
    if arch.norm != "none" or arch.width_growth != 1.0:
        return False
    depths = {arch.depth, *_ints(space, "depth")}
    if len(depths) == 1:
        return False  # one depth: nothing would share the program
    if arch.backbone == "cnn":
        if input_shape is None or arch.downsample == "alternate":
            return False  # "alternate" pools by the distance to the last block
        deepest = dataclasses.replace(arch, depth=max(depths))
        return not any(models.pool_schedule(deepest, input_shape)[1:])
    return True


def gates(mask) -> tuple:
    """Per block of a depth-padded bucket's instance, whether the block is in the instance: a
    traced bool read off its mask (the first unit of its layer's bias)."""
    found = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(mask)[0]:
        names = _names(path)
        if names[0] == "blocks" and names[2:] == ["layer", "bias"]:
            found[names[1]] = leaf[0] > 0
    return tuple(found[i] for i in range(len(found)))


def _names(path: tuple) -> list:
    """A parameter's path as plain names (``nnx.Variable``'s trailing ``.value`` dropped)."""
    names = []
    for k in path:
        if isinstance(k, jax.tree_util.GetAttrKey):
            continue
        names.append(getattr(k, "key", getattr(k, "idx", k)))
    return names


def _axes(path: tuple, ndim: int, backbone: str) -> tuple:
    """What bounds each axis of the parameter at ``path``.

    ``None``: never padded; ``("width", i)``: the first ``widths[i]`` entries are real;
    ``"embed"``: the first ``embed_dim``; ``"last_width"``: the last real block's width (an MLP
    embedding's input; a depth-padded bucket has blocks of width 0 after it); ``"flat_width"``:
    a flattened (..., channels) axis of the last block's output, whose channel index is
    ``i % channels``.
    """
    names = _names(path)
    leaf = names[-1]
    if names[0] == "blocks":
        index = names[1]
        out = ("width", index)
        if leaf in ("bias", "scale"):  # layer, skip and norm vectors: one per output unit
            return (out,)
        into = None if index == 0 else ("width", index - 1)
        spatial = (None,) * (ndim - 2)  # a conv kernel's (k, k); a dense kernel has none
        return (*spatial, into, out)
    if names[0] == "embedding":
        if leaf == "bias":
            return ("embed",)
        return ("flat_width" if backbone == "cnn" else "last_width", "embed")
    if names[0] == "head":
        return (None,) if leaf == "bias" else ("embed", None)
    raise ValueError(f"no padding rule for parameter {'/'.join(map(str, names))}")


def _axis_mask(kind, length: int, channels: int, sizes: RealSizes) -> jax.Array:
    index = jnp.arange(length)
    if kind is None:
        return jnp.ones((length,), bool)
    if kind == "embed":
        return index < sizes.embed_dim
    if kind in ("flat_width", "last_width"):
        # The last real block's width: a depth-padded bucket's blocks after it have width 0.
        last = jnp.take(sizes.widths, jnp.sum(sizes.widths > 0) - 1)
        return (index % channels if kind == "flat_width" else index) < last
    return index < sizes.widths[kind[1]]


def masks(params, bucket_arch: models.Arch, sizes: RealSizes):
    """0/1 float masks shaped like ``params`` (one instance; traceable in ``sizes``)."""

    def mask(path, leaf):
        axes = _axes(path, leaf.ndim, bucket_arch.backbone)
        out = jnp.ones((), leaf.dtype)
        for axis, kind in enumerate(axes):
            if kind is None:
                continue
            m = _axis_mask(kind, leaf.shape[axis], bucket_arch.widths[-1], sizes)
            shape = [1] * leaf.ndim
            shape[axis] = leaf.shape[axis]
            out = out * m.reshape(shape).astype(leaf.dtype)
        return jnp.broadcast_to(out, leaf.shape)

    return jax.tree_util.tree_map_with_path(mask, params)


# jax.nn.initializers.variance_scaling's constant: the std of a standard normal truncated to
# [-2, 2], so that the truncated draw has the intended variance.
_TRUNCATED_STD = 0.87962566103423978


def init(abstract_params, mask_tree, key: jax.Array):
    """A fresh padded instance: ``lecun_normal`` kernels on the real fan-in, zero biases, unit
    norm scales, masked.

    The model's own init (``nnx.Linear`` and ``models.ConvSame``) is ``lecun_normal``, a normal
    truncated to two deviations with variance ``1 / fan_in``, and zero biases; a norm's scale
    starts at one (``nnx.LayerNorm``, ``nnx.GroupNorm``). Here ``fan_in`` is
    the real one (a traced count), so real units get exactly the unpadded distribution. All
    kernels come from one truncated-normal draw (one ``erfinv`` to compile, not one per layer).
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(abstract_params)
    masks_flat = treedef.flatten_up_to(mask_tree)
    kernels = [i for i, (path, _) in enumerate(leaves) if _names(path)[-1] == "kernel"]
    total = sum(leaves[i][1].size for i in kernels)
    draws = jax.random.truncated_normal(key, -2.0, 2.0, (total,), jnp.float32)
    out, offset = [], 0
    for i, ((_, leaf), mask) in enumerate(zip(leaves, masks_flat, strict=True)):
        if i in kernels:
            real_in = jnp.maximum(jnp.sum(mask[..., 0]), 1.0)
            std = jax.lax.rsqrt(real_in) / _TRUNCATED_STD
            value = draws[offset : offset + leaf.size].reshape(leaf.shape) * std
            offset += leaf.size
        elif _names(leaves[i][0])[-1] == "scale":
            value = jnp.ones(leaf.shape, leaf.dtype)
        else:
            value = jnp.zeros(leaf.shape, leaf.dtype)
        out.append((value * mask).astype(leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


def unpad(pure: Mapping, bucket_arch: models.Arch, arch: models.Arch) -> dict:
    """The variables of ``arch`` cut out of a padded instance's pure dict (host arrays): its
    parameters, or its other state (log-rates), whose blocks beyond ``arch.depth`` it drops."""
    widths, channels = arch.widths, bucket_arch.widths[-1]

    def real(kind) -> int:
        if kind == "embed":
            return arch.embed_dim
        return widths[-1] if kind == "last_width" else widths[kind[1]]

    def cut(path, leaf):
        leaf = np.asarray(leaf)
        if path[0] not in ("blocks", "embedding", "head") or path[-1] == "log_rate":
            return leaf  # LogRate and other state: not padded
        keyed = [jax.tree_util.DictKey(p) for p in path]
        axes = _axes(tuple(keyed), leaf.ndim, bucket_arch.backbone)
        for axis, kind in enumerate(axes):
            if kind == "flat_width":
                rows = leaf.shape[axis] // channels
                grid = leaf.reshape(rows, channels, *leaf.shape[axis + 1 :])
                leaf = grid[:, : widths[-1]].reshape(rows * widths[-1], *leaf.shape[axis + 1 :])
            elif kind is not None:
                leaf = np.take(leaf, np.arange(real(kind)), axis=axis)
        return leaf

    def walk(node, path):
        if isinstance(node, Mapping):
            if path == ("blocks",):  # a depth-padded bucket's blocks beyond the instance
                node = {k: v for k, v in node.items() if k < arch.depth}
            return {k: walk(v, (*path, k)) for k, v in node.items()}
        return cut(path, node)

    return walk(pure, ())
