"""The randomized tolerance: when to stop a run of rounds (or epochs), and which one was best.

Standard library only (no JAX, no NumPy), so any training loop can use it. ``State`` is immutable,
``update`` returns a new one, and ``to_dict``/``from_dict`` round-trip exactly through JSON.
The rules, for mode "max" ("min" mirrors every comparison), in the order ``update`` applies them,
and where Keras, Lightning and Flax ``EarlyStopping`` differ:

- Patience (claim 3): ``max(1, floor(exp(r) * ratio * rounds + 0.5))``, ``r <= 0`` drawn at random,
  unless a fixed ``patience`` is given. The others only take a fixed patience.
- Non-finite metric: ``nonfinite="worse"`` counts it as below the best, never as the best (so does
  Keras: comparisons with NaN are false); ``"stop"`` stops at once (Lightning's default
  ``check_finite=True``). Flax counts NaN as no improvement, but a first NaN becomes its best and
  blocks every later improvement.
- Improvement: ``metric > best + min_delta + min_rel_delta * |best|`` sets the best, streak 0.
  None of the others has a relative delta.
- Tie (claim 4): a round not below the best resets the streak (``ties_reset=True``); the best stays
  the earliest round. The others count a tie as no improvement; ``ties_reset=False`` is their rule.
- Otherwise the streak grows by one, except in warm-up (round index < ``warmup``), where a round
  may still set the best. Keras's ``start_from_epoch`` ignores those epochs entirely.
- Baseline: a round that does not strictly beat ``baseline`` adds to the streak, even when it sets
  the best. Keras then keeps its ``wait`` too, but skips that epoch's stop check.
- Target: a finite metric ``>= target`` stops, after it was judged (so it can be the best).
  Lightning's ``stopping_threshold`` is strict and checked before its best is updated.
- Patience stop: ``streak >= patience``, on the patience-th round in a row without improvement,
  as Keras (``wait >= patience``, never at epoch 0) and Lightning (``wait_count >= patience``).
  Flax tests ``patience_count >= patience`` before counting the update: one update later.
- Budget (claim 5): if the patience exceeds the rounds left, the budget grows to fit it, up to
  ``max_rounds`` (default twice the initial budget); reaching the budget stops. None of the
  others extends a budget.

Updating a stopped state raises ``StoppedError``; a bad argument raises ``ArgumentError`` (a
``ValueError``) whose ``argument`` names it, with its allowed range in the message; a metric
that is not a real number raises ``TypeError``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import random

_MODES = ("max", "min")
_NONFINITE_POLICIES = ("worse", "stop")


class StoppedError(RuntimeError):
    """Raised by ``update`` on a state that has already stopped."""


class ArgumentError(ValueError):
    """A bad argument of ``init`` (or field of ``State.from_dict``); ``argument`` names it."""

    def __init__(self, argument: str, message: str):
        super().__init__(message)
        self.argument = argument


@dataclasses.dataclass(frozen=True)
class State:
    """The whole tolerance state; every field is a JSON scalar (None, bool, int, str, finite float).

    The first fields are the ``init`` arguments (``r`` and ``seed`` None when unused,
    ``max_rounds`` resolved). ``rounds`` is the current budget, ``round`` the number of updates so
    far, ``best_round`` the 0-based index of the best round, ``improved`` whether the last update
    set a new best, ``reason`` one of None, "nonfinite", "target", "patience", "budget",
    "max_rounds".
    """

    rounds: int
    patience: int
    r: float | None
    seed: int | None
    ratio: float
    mode: str
    min_delta: float
    min_rel_delta: float
    ties_reset: bool
    warmup: int
    baseline: float | None
    target: float | None
    nonfinite: str
    extend: bool
    max_rounds: int
    initial_rounds: int
    round: int = 0
    best: float | None = None
    best_round: int | None = None
    streak: int = 0
    improved: bool = False
    stopped: bool = False
    reason: str | None = None

    def to_dict(self) -> dict:
        """Returns the state as a dict that ``json.dumps`` accepts even with ``allow_nan=False``."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> State:
        """Rebuilds the equal ``State`` from ``to_dict`` output, e.g. after a JSON round trip."""
        names = {field.name for field in dataclasses.fields(cls)}
        if set(data) != names:
            missing, unknown = sorted(names - set(data)), sorted(set(data) - names)
            raise ValueError(
                f"State.from_dict needs exactly the State fields; missing {missing}, "
                f"unknown {unknown}: pass the dict that State.to_dict() wrote."
            )
        state = cls(**data)
        _check_config(state)
        return state


def _is_int(value) -> bool:
    # numbers.Integral/Real cover NumPy scalars without importing NumPy; bool is refused.
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value) -> bool:
    """A real number that is not a bool (shared with ``gain``)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_finite(value) -> bool:
    return is_real(value) and math.isfinite(value)


def _require(condition: bool, argument: str, message: str) -> None:
    if not condition:
        raise ArgumentError(argument, message)


def _check_rounds_ratio_r(rounds, ratio, r) -> None:
    _require(
        _is_int(rounds) and rounds >= 1, "rounds", f"rounds must be an int >= 1, got {rounds!r}."
    )
    _require(
        is_real(ratio) and 0 < ratio <= 1,
        "ratio",
        f"ratio must be a real number in (0, 1] (the patent uses [0.7, 0.9]), got {ratio!r}.",
    )
    _require(is_finite(r) and r <= 0, "r", f"r must be a finite real number <= 0, got {r!r}.")


def _check_config(state: State) -> None:
    """Validates the configuration fields of a state (shared by ``init`` and ``from_dict``)."""
    s = state
    _check_rounds_ratio_r(s.initial_rounds, s.ratio, 0.0 if s.r is None else s.r)
    finite = "a finite real number"
    # Infinite deltas, baselines and targets are refused: they would make the state invalid JSON.
    checks = (
        ("patience", _is_int(s.patience) and s.patience >= 1, "an int >= 1"),
        ("warmup", _is_int(s.warmup) and s.warmup >= 0, "an int >= 0"),
        (
            "max_rounds",
            _is_int(s.max_rounds) and s.max_rounds >= s.initial_rounds,
            f"an int >= rounds ({s.initial_rounds})",
        ),
        ("seed", s.seed is None or _is_int(s.seed), "an int or None"),
        ("min_delta", is_finite(s.min_delta) and s.min_delta >= 0, f"{finite} >= 0"),
        ("min_rel_delta", is_finite(s.min_rel_delta) and s.min_rel_delta >= 0, f"{finite} >= 0"),
        ("baseline", s.baseline is None or is_finite(s.baseline), f"None or {finite}"),
        ("target", s.target is None or is_finite(s.target), f"None or {finite}"),
        ("mode", s.mode in _MODES, f"one of {_MODES}"),
        ("nonfinite", s.nonfinite in _NONFINITE_POLICIES, f"one of {_NONFINITE_POLICIES}"),
        ("ties_reset", isinstance(s.ties_reset, bool), "True or False"),
        ("extend", isinstance(s.extend, bool), "True or False"),
    )
    for name, ok, allowed in checks:
        _require(ok, name, f"{name} must be {allowed}, got {getattr(s, name)!r}.")


def patience_from(rounds: int, ratio: float, r: float) -> int:
    """The claim-3 tolerance: ``max(1, floor(exp(r) * ratio * rounds + 0.5))``, in binary64.

    Args:
        rounds: the round budget R, an int >= 1.
        ratio: the calibration ratio, in (0, 1] (the patent uses [0.7, 0.9]).
        r: the log-weight, finite and <= 0, so the weight ``exp(r)`` is in (0, 1].

    Returns:
        The patience, an int in ``[1, max(1, floor(ratio * rounds + 0.5))]``.
    """
    _check_rounds_ratio_r(rounds, ratio, r)
    return max(1, math.floor(math.exp(r) * ratio * rounds + 0.5))


def draw_r(seed: int) -> float:
    """Draws ``r = ln(u)`` with ``u = 1 - Random(seed).random()`` in (0, 1], so ``r <= 0``.

    Args:
        seed: an int >= 0 seed for the standard library's Mersenne Twister (which would treat
            -s like s, so negative seeds are refused).

    Returns:
        A float <= 0, the same for the same seed.
    """
    _require(_is_int(seed) and seed >= 0, "seed", f"seed must be an int >= 0, got {seed!r}.")
    return math.log(1.0 - random.Random(int(seed)).random())


def init(
    rounds: int,
    *,
    patience: int | None = None,
    r: float | None = None,
    seed: int | None = None,
    ratio: float = 0.8,
    mode: str = "max",
    min_delta: float = 0.0,
    min_rel_delta: float = 0.0,
    ties_reset: bool = True,
    warmup: int = 0,
    baseline: float | None = None,
    target: float | None = None,
    nonfinite: str = "worse",
    extend: bool = True,
    max_rounds: int | None = None,
) -> State:
    """Starts a tolerance state; the rules are listed in the module docstring.

    Args:
        rounds: the initial budget, an int >= 1; it sets the drawn patience and the horizon.
        patience: a fixed patience (int >= 1) instead of the claim-3 draw.
        r: the log-weight of the claim-3 draw (finite, <= 0).
        seed: an int seed from which ``r`` is drawn (``draw_r``). With none of ``patience``,
            ``r`` and ``seed``, ``r`` comes from OS entropy and is recorded in the state.
        ratio: the calibration ratio in (0, 1]; default 0.8.
        mode: "max" (higher is better) or "min".
        min_delta: absolute margin (>= 0) a metric must clear to improve.
        min_rel_delta: margin (>= 0) relative to ``|best|`` added to ``min_delta``.
        ties_reset: whether a round not below the best resets the streak (claim 4).
        warmup: rounds with index < ``warmup`` never add to the streak.
        baseline: a round that does not strictly beat it adds to the streak.
        target: a finite metric reaching it stops the run.
        nonfinite: "worse" (NaN/inf counts as below the best) or "stop".
        extend: whether to grow the budget so the tolerance window fits (claim 5).
        max_rounds: the hard cap on the budget, >= ``rounds``; default ``2 * rounds``.

    Returns:
        The state before the first round.
    """
    rounds, patience, seed, warmup, max_rounds = map(
        _to_int, (rounds, patience, seed, warmup, max_rounds)
    )
    choices = (("patience", patience), ("r", r), ("seed", seed))
    given = [name for name, value in choices if value is not None]
    _require(
        len(given) <= 1,
        given[-1] if given else "",
        f"give at most one of patience, r, seed; got {', '.join(given)}.",
    )
    if seed is not None:
        r = draw_r(seed)
    elif patience is None and r is None:
        r = math.log(1.0 - random.SystemRandom().random())
    if patience is None:
        patience = patience_from(rounds, ratio, r)
    state = State(
        rounds=rounds,
        patience=patience,
        r=None if r is None else _to_float(r),
        seed=seed,
        ratio=_to_float(ratio),
        mode=mode,
        min_delta=_to_float(min_delta),
        min_rel_delta=_to_float(min_rel_delta),
        ties_reset=ties_reset,
        warmup=warmup,
        baseline=None if baseline is None else _to_float(baseline),
        target=None if target is None else _to_float(target),
        nonfinite=nonfinite,
        extend=extend,
        max_rounds=2 * rounds if max_rounds is None and _is_int(rounds) else max_rounds,
        initial_rounds=rounds,
    )
    _check_config(state)
    return state


# Fields are stored as Python ints and floats, so the JSON round trip is exact and NumPy scalars
# never leak in; anything else is left for _check_config to refuse with the allowed range.
def _to_int(value):
    return int(value) if _is_int(value) else value


def _to_float(value):
    return float(value) if is_real(value) else value


def metric_to_float(metric) -> float:
    """A metric as binary64 (an int too large is an infinity); TypeError if not a real number."""
    if not is_real(metric):
        raise TypeError(f"metric must be a real number (int or float), got {metric!r}.")
    try:
        return float(metric)
    except OverflowError:  # an int too large for binary64 is an infinity in effect
        return math.inf if metric > 0 else -math.inf  # copysign would overflow converting it


def update(state: State, metric: float) -> State:
    """Judges the round with index ``state.round`` by its metric and returns the new state.

    Args:
        state: a state that has not stopped.
        metric: the round's score, a real number (NaN and infinities follow ``nonfinite``).

    Returns:
        The new state; ``round`` is always one more, and ``stopped``/``reason`` say whether and
        why the run ends here.
    """
    if state.stopped:
        raise StoppedError(
            f"the tolerance state stopped at round {state.round} ({state.reason}); "
            "start a new one with stopping.init(...)."
        )
    value = metric_to_float(metric)
    round_index = state.round
    finite = math.isfinite(value)
    if not finite and state.nonfinite == "stop":
        return dataclasses.replace(
            state, round=round_index + 1, improved=False, stopped=True, reason="nonfinite"
        )

    best, maximize = state.best, state.mode == "max"
    improved = not_below = False
    if finite and best is None:
        improved = True
    elif finite:
        # Evaluated left to right exactly as the rule reads, so the rounding is the documented one.
        relative = state.min_rel_delta * abs(best)
        if maximize:
            improved, not_below = value > best + state.min_delta + relative, value >= best
        else:
            improved, not_below = value < best - state.min_delta - relative, value <= best
    resets = improved or (state.ties_reset and not_below)
    if state.baseline is not None:
        beats_baseline = value > state.baseline if maximize else value < state.baseline
        resets = resets and beats_baseline
    if resets:
        streak = 0
    elif round_index < state.warmup:
        streak = state.streak
    else:
        streak = state.streak + 1

    state = dataclasses.replace(
        state,
        round=round_index + 1,
        best=value if improved else best,
        best_round=round_index if improved else state.best_round,
        streak=streak,
        improved=improved,
    )
    if finite and state.target is not None:
        reached = value >= state.target if maximize else value <= state.target
        if reached:
            return dataclasses.replace(state, stopped=True, reason="target")
    if state.streak >= state.patience:
        return dataclasses.replace(state, stopped=True, reason="patience")
    rounds = state.rounds
    if state.extend and state.patience > rounds - state.round:
        rounds = min(state.round + state.patience, state.max_rounds)
    if state.round >= rounds:
        reason = "max_rounds" if state.round >= state.max_rounds else "budget"
        return dataclasses.replace(state, rounds=rounds, stopped=True, reason=reason)
    return dataclasses.replace(state, rounds=rounds)


def describe(state: State) -> str:
    """One line for logs, e.g. ``round 7/30, best 0.91 at round 3, streak 2/16, running``."""
    best = "none" if state.best is None else f"{state.best:.6g} at round {state.best_round}"
    status = f"stopped ({state.reason})" if state.stopped else "running"
    return (
        f"round {state.round}/{state.rounds}, best {best}, "
        f"streak {state.streak}/{state.patience}, {status}"
    )
