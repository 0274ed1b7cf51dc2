"""Your own backbones: register a Flax NNX model from your config file, then search its fields.

A backbone is a function ``build_fn(choice, inputs, *, log_rate, rngs) -> nnx.Module``:

* ``choice``: the backbone's own fields (``fields`` below, overridden by what the search chose);
* ``inputs``: ``Inputs(shape=(height, width, channels), num_classes=...)``;
* ``log_rate``: the round's dropout log-rate; claim 2 wants every feature block to end in
  ``models.ExpDropout(log_rate)`` (``models.FeatureBlock`` is one such block);
* ``rngs``: an ``nnx.Rngs`` with a ``params`` stream for the initializers.

The module must have ``embed(images, key=None) -> (N, D)`` (the feature vector of claim 7) and
``logits(images, key=None) -> (N, num_classes)``; ``key`` is the dropout key, None in evaluation.
A config file registers it at import time::

    from jaxes import backbones
    backbones.register("mixer", build_mixer, fields={"blocks": 2, "patch": 2, "hidden": 32})

and searches it as ``backbone = ("mlp", "mixer")`` with its fields conditional on it, e.g.
``space.hidden = {"values": (16, 32), "when": {"backbone": "mixer"}}`` (configs/own_model.py).
The file that registered a backbone is recorded with the best instance, so ``jaxes.embed`` and
``jaxes.export`` rebuild it from the workdir alone (``ensure``). A registered backbone trains as it
is: it is never padded into a shared size bucket.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import inspect
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

# The names of the built-in backbones (jaxes.models builds them); none of them can be registered.
BUILTIN = ("mlp", "cnn")


@dataclasses.dataclass(frozen=True)
class Inputs:
    """What a backbone is built for: the image shape ``(height, width, channels)`` and classes."""

    shape: tuple[int, int, int]
    num_classes: int


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A registered backbone.

    Attributes:
      name: its ``backbone`` value in a choice.
      build_fn: ``build_fn(choice, inputs, *, log_rate, rngs) -> nnx.Module``.
      fields: its own fields with their defaults (JSON scalars).
      source: the file that registered it (re-imported by ``ensure``), or None.
    """

    name: str
    build_fn: Callable[..., Any]
    fields: Mapping[str, Any]
    source: str | None


# The process's registry: filled by config files as they are imported (module docstring). It is
# the one place a user's code hands models to jaxes without editing it; ``ensure`` refills it.
_REGISTRY: dict[str, Backbone] = {}


def _scalar(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, str | int | bool)


def register(
    name: str, build_fn: Callable[..., Any], *, fields: Mapping[str, Any] | None = None
) -> Backbone:
    """Registers ``build_fn`` as backbone ``name`` (again from the same file: replaced).

    Args:
      name: the backbone's name (not ``mlp`` or ``cnn``).
      build_fn: builds the module (module docstring).
      fields: the backbone's own fields and their defaults (JSON scalars); a search space field
        that applies to this backbone must be one of them.

    Returns:
      The registration.

    Raises:
      ValueError: a bad name, fields or build function, or the name registered by another file.
    """
    if not isinstance(name, str) or not name.isidentifier() or name in BUILTIN:
        raise ValueError(
            f"backbone name {name!r} must be an identifier other than {BUILTIN}; pick another."
        )
    if not callable(build_fn):
        raise ValueError(f"backbone {name!r}: build_fn must be callable, got {build_fn!r}.")
    fields = dict(fields or {})
    for field, value in fields.items():
        if not isinstance(field, str) or field == "backbone" or not _scalar(value):
            raise ValueError(
                f"backbone {name!r}: field {field!r} needs a name other than 'backbone' and a "
                f"JSON scalar default, got {value!r}."
            )
    try:
        source = inspect.getsourcefile(build_fn)
    except TypeError:  # a builtin or a C function: nothing to re-import
        source = None
    source = str(Path(source).resolve()) if source else None
    old = _REGISTRY.get(name)
    if old is not None and old.source != source:
        raise ValueError(
            f"backbone {name!r} is already registered from {old.source}; pick another name."
        )
    backbone = Backbone(name, build_fn, fields, source)
    _REGISTRY[name] = backbone
    return backbone


def is_registered(name: str) -> bool:
    return name in _REGISTRY


def names() -> tuple[str, ...]:
    """The registered backbones' names, sorted."""
    return tuple(sorted(_REGISTRY))


def get(name: str) -> Backbone:
    """The registration of ``name``; raises ValueError naming the fix if there is none."""
    if name not in _REGISTRY:
        raise ValueError(
            f"backbone {name!r} is not registered; import the file that calls "
            f"jaxes.backbones.register({name!r}, ...) first (registered: {list(names())})."
        )
    return _REGISTRY[name]


def ensure(name: str, source: str | None) -> Backbone:
    """The registration of ``name``, importing ``source`` (the recorded file) if it is missing.

    Raises:
      ValueError: ``source`` is gone or does not register ``name``.
    """
    if name in _REGISTRY or name in BUILTIN:
        return _REGISTRY.get(name)
    if source is None or not Path(source).is_file():
        raise ValueError(
            f"backbone {name!r} is not registered and the file that registered it ({source}) is "
            "not there; import your module that calls jaxes.backbones.register first."
        )
    module = f"jaxes_user_backbone_{hashlib.sha1(source.encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(module, source)
    spec.loader.exec_module(importlib.util.module_from_spec(spec))
    return get(name)


def build(name: str, choice: Mapping, shape, num_classes: int, *, log_rate: float, rngs):
    """Builds backbone ``name`` with its defaults overridden by ``choice``; checks the result."""
    backbone = get(name)
    unknown = sorted(set(choice) - set(backbone.fields))
    if unknown:
        raise ValueError(
            f"backbone {name!r} has no field(s) {unknown}; it declares {sorted(backbone.fields)}."
        )
    inputs = Inputs(tuple(int(v) for v in shape), int(num_classes))
    module = backbone.build_fn({**backbone.fields, **choice}, inputs, log_rate=log_rate, rngs=rngs)
    for method in ("embed", "logits"):
        if not callable(getattr(module, method, None)):
            raise ValueError(
                f"backbone {name!r} built a {type(module).__name__} without a {method}(images, "
                "key=None) method; give its module embed and logits."
            )
    return module
