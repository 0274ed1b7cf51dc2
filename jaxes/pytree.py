"""The one codec of parameter pytrees for checkpoints and exports.

Orbax stores every dict key as a string and ``jax.export`` serializes string keys, but an
``nnx.State``'s pure dict indexes ``nnx.List`` children by int. ``structure`` records the
containers and key types as JSON; ``rebuild`` turns a string-keyed tree (or Orbax's metadata of
one) back into the original containers. Standard library only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def structure(node: Any) -> Any:
    """JSON description of a pytree's containers, so int keys and tuples survive a round trip.

    Raises:
      ValueError: a dict key that is not str or int, or a leaf that is not an array.
    """
    if isinstance(node, dict):
        for key in node:
            if not isinstance(key, str | int) or isinstance(key, bool):
                raise ValueError(
                    f"params has a dict key {key!r} of type {type(key).__name__}; use str or int "
                    "keys (nnx.to_pure_dict gives these)."
                )
        return {"dict": [[key, structure(child)] for key, child in node.items()]}
    if isinstance(node, list | tuple):
        kind = "list" if isinstance(node, list) else "tuple"
        return {kind: [structure(child) for child in node]}
    if hasattr(node, "shape") and hasattr(node, "dtype"):
        return "array"
    raise ValueError(
        f"params has a leaf of type {type(node).__name__}; pass nested dicts, lists and tuples "
        "of arrays, e.g. nnx.to_pure_dict(state)."
    )


def with_str_keys(tree: Any) -> Any:
    """The tree with every dict key made a string (what Orbax and ``jax.export`` keep)."""
    if isinstance(tree, dict):
        return {str(key): with_str_keys(value) for key, value in tree.items()}
    if isinstance(tree, list | tuple):
        return type(tree)(with_str_keys(value) for value in tree)
    return tree


def rebuild(shape: Any, saved: Any, leaf_fn: Callable[[Any], Any] = lambda leaf: leaf) -> Any:
    """Undoes ``with_str_keys``: the containers of ``shape`` (a ``structure``) around ``saved``.

    Args:
      shape: what ``structure`` returned for the original tree.
      saved: the string-keyed tree, or Orbax's metadata tree of it.
      leaf_fn: applied to each leaf of ``saved`` (e.g. metadata -> ``jax.ShapeDtypeStruct``).
    """
    if shape == "array":
        return leaf_fn(saved)
    if "dict" in shape:
        return {key: rebuild(child, saved[str(key)], leaf_fn) for key, child in shape["dict"]}
    kind, children = next(iter(shape.items()))
    rebuilt = [rebuild(child, saved[i], leaf_fn) for i, child in enumerate(children)]
    return rebuilt if kind == "list" else tuple(rebuilt)
