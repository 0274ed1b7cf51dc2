"""One field of a search space: its declaration parsed, its values drawn, checked and mutated.

``jaxes.space`` documents the declarations and combines fields into a space.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax

JSONScalar = str | int | float | bool | None

# The stream of a mutation's step (docs/design.md §4: fold_in with constants, never call order).
_STEP = 12
# A mutated range value moves by this fraction of the range (in its scale) times a normal draw.
MUTATION_SCALE = 0.25


class SearchError(ValueError):
    """A search space, parameter, choice or state is invalid.

    ``field`` names the space field it is about (None if none), ``problem`` says the rest, so a
    caller can name the config path without parsing the message.
    """

    def __init__(self, problem: str, field: str | None = None):
        where = "" if field is None else f"Search space field {field!r}: "
        super().__init__(where + problem)
        self.field = field
        self.problem = problem


def _error(field: str | None, problem: str) -> SearchError:
    return SearchError(problem, field)


def _as_dict(value: Any) -> dict | None:
    # ml_collections.ConfigDict is not a Mapping but has items(); configs hand us either.
    if isinstance(value, Mapping) or callable(getattr(value, "items", None)):
        return dict(value.items())
    return None


def _is_json_scalar(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    return value is None or isinstance(value, str | int | bool)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def key_of(value: JSONScalar) -> str:
    """JSON identity of a value: 1, 1.0 and True differ."""
    return json.dumps(value)


@dataclasses.dataclass(frozen=True)
class Field:
    """One field of a space.

    Attributes:
      name: the field name.
      kind: ``"values"``, ``"int"`` or ``"float"``.
      values: the listed values (``"values"`` only).
      low, high: the inclusive bounds (ranges only).
      log: whether a range is drawn and mutated in log space.
      when: condition field -> the values under which this field applies; empty: always.
    """

    name: str
    kind: str
    values: tuple = ()
    low: float = 0
    high: float = 0
    log: bool = False
    when: tuple[tuple[str, tuple], ...] = ()

    @property
    def size(self) -> float:
        """How many distinct values the field holds (``math.inf`` for a float range)."""
        if self.kind == "values":
            return len(self.values)
        return self.high - self.low + 1 if self.kind == "int" else math.inf

    @property
    def mutable(self) -> bool:
        return self.size > 1

    def contains(self, value: Any) -> bool:
        if self.kind == "values":
            return key_of(value) in [key_of(v) for v in self.values]
        if self.kind == "int":
            return _is_int(value) and self.low <= value <= self.high
        return _is_number(value) and self.low <= value <= self.high

    def describe(self) -> str:
        if self.kind == "values":
            return f"one of {list(self.values)}"
        scale = ", log scale" if self.log else ""
        return f"an {self.kind} in [{self.low}, {self.high}]{scale}"

    def default(self) -> JSONScalar:
        """The first listed value, or the low end of a range."""
        return self.values[0] if self.kind == "values" else self.low

    def bounds(self) -> tuple:
        """The values a size bucket must cover: the list, or an int range's two ends."""
        if self.kind == "values":
            return self.values
        return (self.low, self.high) if self.kind == "int" else ()

    def _to_scale(self, x: float) -> float:
        return math.log(x) if self.log else float(x)

    def _from_scale(self, s: float) -> JSONScalar:
        x = math.exp(s) if self.log else s
        if self.kind == "int":
            return int(min(max(round(x), self.low), self.high))
        return float(min(max(x, self.low), self.high))  # exp(log(high)) may round past high

    def _scale_bounds(self) -> tuple[float, float]:
        # An int range widens by half a unit at each end, so that rounding makes its ends as
        # likely as the values between them.
        pad = 0.5 if self.kind == "int" else 0.0
        return self._to_scale(self.low - pad), self._to_scale(self.high + pad)

    def from_unit(self, u: float) -> JSONScalar:
        """The range value at ``u`` in [0, 1) of its (linear or log) scale."""
        lo, hi = self._scale_bounds()
        return self._from_scale(lo + u * (hi - lo))

    def mutate(self, value: JSONScalar, key: jax.Array) -> JSONScalar:
        """A different value near ``value``.

        A list draws another of its values uniformly. A range moves by a normal step of
        ``MUTATION_SCALE`` times its width in its (log) scale, reflected back into the range at its
        ends; an int range moves by at least one.
        """
        if self.kind == "values":
            current = [key_of(v) for v in self.values].index(key_of(value))
            offset = int(jax.random.randint(key, (), 0, len(self.values) - 1))
            return self.values[offset if offset < current else offset + 1]  # skips the current
        lo, hi = self._scale_bounds()
        step = float(jax.random.normal(jax.random.fold_in(key, _STEP))) * MUTATION_SCALE * (hi - lo)
        new = self._from_scale(_reflect(self._to_scale(value) + step, lo, hi))
        if self.kind == "int" and new == value:
            up = value + (1 if step >= 0 else -1)
            new = up if self.low <= up <= self.high else 2 * value - up
        return new


def _reflect(s: float, lo: float, hi: float) -> float:
    """``s`` folded into [lo, hi] by reflection at the ends (a mirror, not a clip)."""
    width = hi - lo
    if width <= 0:
        return lo
    t = (s - lo) % (2 * width)
    return lo + (t if t <= width else 2 * width - t)


def _parse_when(name: str, when: Any) -> tuple[tuple[str, tuple], ...]:
    conditions = _as_dict(when)
    if conditions is None or not conditions:
        raise _error(
            name,
            f'"when" must map a field to its value(s), e.g. {{"backbone": "cnn"}}, not {when!r}.',
        )
    parsed = []
    for field in sorted(conditions, key=str):
        values = conditions[field]
        values = tuple(values) if isinstance(values, list | tuple) else (values,)
        if not values or not all(_is_json_scalar(v) for v in values):
            raise _error(name, f'"when" gives {field!r} the values {values!r}; list JSON scalars.')
        parsed.append((str(field), values))
    return tuple(parsed)


def parse_field(name: str, spec: Any) -> Field:
    """One field from its declaration (module docstring); raises SearchError naming it."""
    if not isinstance(name, str):
        raise _error(str(name), "a search space field must be a string name.")
    mapping = _as_dict(spec)
    if mapping is None:
        if isinstance(spec, str | bytes) or not isinstance(spec, Sequence):
            raise _error(
                name,
                f"must list its values, e.g. (1, 2), or be a range {{'low': ..., 'high': ...}}, "
                f"not {spec!r}.",
            )
        mapping = {"values": spec}
    unknown = sorted(set(mapping) - {"values", "low", "high", "log", "when"})
    if unknown:
        raise _error(
            name, f"has unknown key {unknown[0]!r}; use values, or low/high/log, and when."
        )
    when = _parse_when(name, mapping["when"]) if "when" in mapping else ()
    if "values" in mapping:
        if {"low", "high", "log"} & set(mapping):
            raise _error(name, "gives both values and a range; keep one.")
        values = mapping["values"]
        if isinstance(values, str | bytes) or not isinstance(values, Sequence) or not values:
            raise _error(name, f"must list at least one value, not {values!r}.")
        for value in values:
            if not _is_json_scalar(value):
                raise _error(
                    name,
                    f"has value {value!r}, which is not a JSON scalar "
                    "(str, int, finite float, bool or None); use one of those.",
                )
        keys = [key_of(value) for value in values]
        if len(set(keys)) != len(keys):
            raise _error(name, "repeats a value; remove duplicates.")
        return Field(name, "values", values=tuple(values), when=when)
    if "low" not in mapping or "high" not in mapping:
        raise _error(name, "a range needs both 'low' and 'high' (or list 'values').")
    low, high, log = mapping["low"], mapping["high"], mapping.get("log", False)
    if not (_is_number(low) and _is_number(high)):
        raise _error(name, f"range bounds must be finite numbers, got {low!r} and {high!r}.")
    if not isinstance(log, bool):
        raise _error(name, f"'log' must be True or False, got {log!r}.")
    kind = "int" if _is_int(low) and _is_int(high) else "float"
    if not low < high:
        raise _error(
            name, f"range needs low < high, got [{low}, {high}]; a single value is a list."
        )
    if log and low <= (0.5 if kind == "int" else 0):
        raise _error(
            name, f"a log range needs low {'>= 1' if kind == 'int' else '> 0'}, got {low}."
        )
    if kind == "float":
        low, high = float(low), float(high)
    return Field(name, kind, low=low, high=high, log=log, when=when)
