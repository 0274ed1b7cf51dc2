"""Search spaces: lists of values, int and float ranges (optionally log-scaled), conditional fields.

A space maps each field name to one of these specs (plain data, so a config holds it and its
``config.json`` records it):

* ``(v1, v2, ...)``: a list of JSON scalars (str, int, finite float, bool, None); discrete.
* ``{"low": 1, "high": 4}``: every int from ``low`` to ``high`` inclusive (both ints).
* ``{"low": 1e-4, "high": 1e-2, "log": True}``: a float range (either bound a float), drawn
  uniformly in log space with ``"log": True`` (then ``low > 0``), else uniformly; ``"log"`` works
  for int ranges too.
* ``{"values": (v1, ...)}``: the list form as a mapping, so that it can take ``"when"``.
* ``"when": {"backbone": "cnn"}`` (or ``{"backbone": ("cnn", "mlp")}``) in any mapping form: the
  field applies only to choices whose ``backbone`` is (one of) those values. A condition names an
  unconditional list field and some of its values; a choice holds exactly its active fields.

``Space`` validates a declaration, counts the distinct choices (``math.inf`` once a float range
is active anywhere), draws, checks and mutates choices. Its draws take all their randomness from
a JAX key. A space of unconditional lists draws exactly as the plain product space always did
(one ``randint`` over the sorted fields), so old runs replay unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from jaxes.fields import (  # noqa: F401 - re-exported: the space's public names
    MUTATION_SCALE,
    Field,
    JSONScalar,
    SearchError,
    _as_dict,
    _error,
    key_of,
    parse_field,
)

# The stream of a draw's continuous fields (docs/design.md §4: fold_in with constants, never
# call order).
_CONTINUOUS = 11


class Space:
    """A validated search space (fields sorted by name, so declaration order never matters).

    Attributes:
      fields: name -> ``Field``.
      size: the number of distinct choices; ``math.inf`` if a float range is ever active.
    """

    def __init__(self, declaration: Any):
        fields = _as_dict(declaration)
        if fields is None:
            raise _error(None, "the search space must map each field to its values.")
        if not fields:
            raise _error(None, "the search space is empty; declare at least one field.")
        self.fields = {name: parse_field(name, fields[name]) for name in sorted(fields, key=str)}
        for field in self.fields.values():
            for cond, values in field.when:
                parent = self.fields.get(cond)
                if parent is None or parent.kind != "values" or parent.when:
                    raise _error(
                        field.name,
                        f'"when" names {cond!r}, which is not an unconditional list field of the '
                        "space; condition on one (e.g. backbone).",
                    )
                for value in values:
                    if not parent.contains(value):
                        raise _error(
                            field.name,
                            f'"when" asks for {cond}={value!r}, not one of {list(parent.values)}.',
                        )
        self.conditions = sorted({cond for f in self.fields.values() for cond, _ in f.when})
        # Each assignment of the condition fields, times the choices of the others it activates.
        self.size = sum(
            math.prod(f.size for n, f in self.active(branch).items() if n not in branch)
            for branch in self._branches()
        )

    def _branches(self) -> list[dict]:
        """Every assignment of the condition fields (one empty one if there are none)."""
        branches = [{}]
        for cond in self.conditions:
            branches = [{**b, cond: v} for b in branches for v in self.fields[cond].values]
        return branches

    def active(self, choice: Mapping) -> dict[str, Field]:
        """The fields that apply to a choice, given (at least) its condition fields."""
        return {
            name: field
            for name, field in self.fields.items()
            if all(key_of(choice.get(cond)) in map(key_of, values) for cond, values in field.when)
        }

    @property
    def discrete(self) -> bool:
        return math.isfinite(self.size)

    def bounds(self) -> dict[str, tuple]:
        """Field -> the values a size bucket must cover (``Field.bounds``)."""
        return {name: field.bounds() for name, field in self.fields.items()}

    def default(self) -> dict:
        """The first value of every field (low end of ranges), active fields only."""
        base = {name: f.default() for name, f in self.fields.items() if not f.when}
        return {name: f.default() for name, f in self.active(base).items()}

    def draw_all(self, key: jax.Array) -> dict:
        """Draws every field, active or not: each field independently, uniformly in its (log) scale.

        Lists and linear int ranges take one ``randint`` over the sorted fields (for a space of
        unconditional lists, exactly the draws the plain product space always made); log int
        ranges and float ranges one ``uniform`` from the ``_CONTINUOUS`` stream. Inactive fields
        are drawn too and dropped, so one field's draw never depends on another's value.
        """
        indexed = [
            f for f in self.fields.values() if f.kind == "values" or (not f.log and f.kind == "int")
        ]
        drawn = {}
        if indexed:
            sizes = jnp.asarray([f.size for f in indexed])
            for field, index in zip(
                indexed, jax.random.randint(key, (len(sizes),), 0, sizes).tolist(), strict=True
            ):
                drawn[field.name] = (
                    field.values[index] if field.kind == "values" else field.low + index
                )
        scaled = [f for f in self.fields.values() if f.name not in drawn]
        if scaled:
            units = jax.random.uniform(jax.random.fold_in(key, _CONTINUOUS), (len(scaled),))
            for field, u in zip(scaled, units.tolist(), strict=True):
                drawn[field.name] = field.from_unit(u)
        return drawn

    def sample(self, key: jax.Array) -> dict:
        """Draws a choice (``draw_all``, its active fields only)."""
        drawn = self.draw_all(key)
        return {name: drawn[name] for name in self.active(drawn)}

    def check(self, choice: Any, what: str = "choice") -> dict:
        """Returns ``choice`` with fields sorted if it is one of the space's, else raises."""
        choice = _as_dict(choice)
        if choice is None:
            raise _error(None, f"the {what} must map each field to a value.")
        for cond in self.conditions:
            if cond not in choice or not self.fields[cond].contains(choice[cond]):
                raise _error(cond, f"the {what} needs {cond} {self.fields[cond].describe()}.")
        active = self.active(choice)
        if set(choice) != set(active):
            raise _error(
                None,
                f"the {what} has fields {sorted(choice)}; for it the space has {sorted(active)}.",
            )
        for name, field in active.items():
            if not field.contains(choice[name]):
                raise _error(
                    name, f"the {what} sets it to {choice[name]!r}, not {field.describe()}."
                )
        return {name: choice[name] for name in active}

    def mutable(self, choice: Mapping) -> list[str]:
        """The active fields of ``choice`` that hold more than one value (mutation targets)."""
        return [name for name, field in self.active(choice).items() if field.mutable]

    def mutate(self, choice: Mapping, field_key: jax.Array, value_key: jax.Array) -> dict:
        """``choice`` with exactly one mutable active field changed (``Field.mutate``).

        Changing a condition field (e.g. the backbone) drops the fields that no longer apply and
        draws those that now do from ``value_key``.

        Raises:
          SearchError: the choice has no mutable field.
        """
        mutable = self.mutable(choice)
        if not mutable:
            raise _error(None, "the choice has no field with two or more values to mutate.")
        name = mutable[int(jax.random.randint(field_key, (), 0, len(mutable)))]
        child = dict(choice)
        child[name] = self.fields[name].mutate(child[name], value_key)
        if name in self.conditions:
            fresh = self.draw_all(jax.random.fold_in(value_key, _CONTINUOUS))
            child = {n: child[n] if n in choice else fresh[n] for n in self.active(child)}
        return child
