"""A value-aware stop for a run of rounds: stop when the rounds left cannot beat the noise.

Standard library only, with the protocol of ``jaxes.stopping`` (``init``, ``update``, an
immutable ``State`` that round-trips exactly through JSON, ``StoppedError``, one-sentence
``ValueError``s naming the argument). Beside the patent's rule, never instead of it.

The rule (mode "max"; "min" negates every metric first). After round ``n``, with the best ``b``
and ``m`` rounds left in the budget, it looks at the recent half of the run, the last
``h = ceil(n / 2)`` rounds (a non-finite round counts as a draw below every other): a search that
learns, as evolution does, proposes from where it is now, so its early rounds understate what the
next ones can reach (the sliding-window estimate of a drifting source; Garivier and Moulines 2011).
It fits a peaks-over-threshold tail (Pickands-Balkema-de Haan) to the ``k = ceil(sqrt(h))`` best
finite values there: exponential excesses over ``u``, the ``(k+1)``-th best (which overstates the
tail of a bounded metric such as an accuracy, and so errs toward running on), whose scale it does
not pretend to know: under the Jeffreys prior the excesses' sum ``S`` leaves the rate Gamma(k, S),
so a next round exceeds ``u`` by more than ``x`` with chance ``(k / h) * (1 + x / S)**-k`` (the
posterior predictive, a generalized Pareto of shape ``1 / k``; Coles 2001, section 9.1.2), a tail
that is heavier when few values lie in it. With ``q(x)`` the chance that such a round beats
``b + x``, the expected gain of the best of ``m`` of them over ``b`` (the expected improvement of
Jones et al. 1998, over the remaining budget) is ``integral_0^inf 1 - (1 - q(x))**m dx``, in closed
form in ``expected_gain``; it needs ``k >= 2`` (at ``k = 1`` its mean is infinite), so the first
estimate comes at round 5. The run stops (reason ``"gain"``) once the gain falls below the noise
floor ``sigma``, the resolution at which a better validation score still means a better instance
(as the automatic termination of Makarova et al. 2022 stops when its regret bound drops below the
metric's statistical error): ``noise`` if given; otherwise, for values on a grid ``i / N`` in
[0, 1] (an accuracy on ``N`` examples, ``N`` the least common denominator of the values), the
binomial standard error ``sqrt(q * (1 - q) / N)`` at ``q = |b|``, at least ``1 / N``; otherwise the
smallest gap between two distinct values seen. No stop comes before ``warmup`` rounds, by default
``max(3, ceil(rounds / e))``, the observation phase of the best-choice problem (Lindley 1961;
Ferguson 1989). When the budget is spent it extends one round at a time, up to ``max_rounds``
(default ``2 * rounds``), while the next round alone is still expected to gain ``sigma``
(``extend``). The defaults were chosen on seeds 0-9 of the tolerance study and are reported on all
20 (README "Results", ``experiments/gain_variants.py``).
"""

from __future__ import annotations

import dataclasses
import fractions
import itertools
import math
import numbers

from jaxes.stopping import ArgumentError, StoppedError, is_finite, is_real, metric_to_float

__all__ = ["State", "StoppedError", "expected_gain", "init", "noise_floor", "update", "window"]

_MODES = ("max", "min")
_NONFINITE_POLICIES = ("worse", "stop")
# A validation split larger than this is treated as continuous (its grid is finer than 1e-6).
_MAX_GRID = 1_000_000


@dataclasses.dataclass(frozen=True)
class State:
    """The whole gain state; every field is a JSON scalar or a list of finite floats and None.

    The first fields are the ``init`` arguments (``max_rounds`` resolved). ``rounds`` is the
    current budget, ``round`` the number of updates so far, ``values`` the metrics seen (as
    given, in round order; None for a non-finite one, which JSON cannot hold), ``best_round`` the
    0-based index of the best round, ``improved`` whether the last update set a new best,
    ``gain`` and ``floor`` the expected gain of the rounds left and the noise floor at the last
    update (None before they can be estimated), ``reason`` one of None, "nonfinite", "gain",
    "budget", "max_rounds".
    """

    rounds: int
    mode: str
    noise: float | None
    warmup: int
    nonfinite: str
    extend: bool
    max_rounds: int
    initial_rounds: int
    round: int = 0
    values: tuple = ()
    best: float | None = None
    best_round: int | None = None
    improved: bool = False
    gain: float | None = None
    floor: float | None = None
    stopped: bool = False
    reason: str | None = None

    @property
    def failed(self) -> int:
        """The number of non-finite rounds so far."""
        return sum(v is None for v in self.values)

    @property
    def streak(self) -> int:
        """Rounds since the best (what ``stopping`` calls the streak, for logs and plots)."""
        return self.round if self.best_round is None else self.round - 1 - self.best_round

    @property
    def patience(self) -> None:
        """No patience: the rule has none (``stopping.State`` compatibility for records)."""
        return None

    @property
    def r(self) -> None:
        """No random draw: the rule is deterministic (``stopping.State`` compatibility)."""
        return None

    def to_dict(self) -> dict:
        """Returns the state as a dict that ``json.dumps`` accepts even with ``allow_nan=False``."""
        d = dataclasses.asdict(self)
        d["values"] = list(self.values)
        return d

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
        values = data["values"]
        _require(
            isinstance(values, list | tuple) and all(v is None or is_finite(v) for v in values),
            "values",
            f"values must be a list of finite real numbers or None, got {values!r}.",
        )
        values = tuple(None if v is None else float(v) for v in values)
        _require(
            len(values) == data["round"],
            "values",
            f"values must hold one entry per round ({data['round']!r}), got {len(values)}.",
        )
        state = cls(**{**data, "values": values})
        _check_config(state)
        return state


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _require(condition: bool, argument: str, message: str) -> None:
    """Raises ``ArgumentError`` (a ``ValueError`` naming ``argument``) unless ``condition``."""
    if not condition:
        raise ArgumentError(argument, message)


def _check_config(s: State) -> None:
    _require(_is_int(s.initial_rounds) and s.initial_rounds >= 1, "rounds",
             f"rounds must be an int >= 1, got {s.initial_rounds!r}.")  # fmt: skip
    checks = (
        ("warmup", _is_int(s.warmup) and s.warmup >= 1, "an int >= 1"),
        ("max_rounds", _is_int(s.max_rounds) and s.max_rounds >= s.initial_rounds,
         f"an int >= rounds ({s.initial_rounds})"),
        ("noise", s.noise is None or (is_finite(s.noise) and s.noise > 0),
         "None or a finite real number > 0"),
        ("mode", s.mode in _MODES, f"one of {_MODES}"),
        ("nonfinite", s.nonfinite in _NONFINITE_POLICIES, f"one of {_NONFINITE_POLICIES}"),
        ("extend", isinstance(s.extend, bool), "True or False"),
    )  # fmt: skip
    for name, ok, allowed in checks:
        _require(ok, name, f"{name} must be {allowed}, got {getattr(s, name)!r}.")


def init(
    rounds: int,
    *,
    mode: str = "max",
    noise: float | None = None,
    warmup: int | None = None,
    nonfinite: str = "worse",
    extend: bool = True,
    max_rounds: int | None = None,
) -> State:
    """Starts a gain state; the rule is in the module docstring. The defaults need no tuning.

    Args:
        rounds: the budget, an int >= 1: the horizon of the expected gain.
        mode: "max" (higher is better) or "min".
        noise: the noise floor (> 0), e.g. the standard error of the metric; None: estimated.
        warmup: the fewest rounds (>= 1) before a gain stop; default
            ``max(3, ceil(rounds / e))`` (module docstring).
        nonfinite: "worse" (NaN/inf counts as a round below the best) or "stop".
        extend: whether the budget grows while the next round alone still clears the floor.
        max_rounds: the hard cap on the budget, >= ``rounds``; default ``2 * rounds``.

    Returns:
        The state before the first round.
    """
    as_int = lambda v: int(v) if _is_int(v) else v  # noqa: E731
    rounds, warmup, max_rounds = as_int(rounds), as_int(warmup), as_int(max_rounds)
    if warmup is None and _is_int(rounds):
        warmup = max(3, math.ceil(rounds / math.e))
    state = State(
        rounds=rounds,
        mode=mode,
        noise=float(noise) if is_real(noise) else noise,
        warmup=warmup,
        nonfinite=nonfinite,
        extend=extend,
        max_rounds=2 * rounds if max_rounds is None and _is_int(rounds) else max_rounds,
        initial_rounds=rounds,
    )
    _check_config(state)
    return state


def _grid(values) -> int | None:
    """The least common denominator N of values whose sizes are all ``i / N`` in [0, 1], else None.

    Sizes, so that ``-accuracy`` (mode "min") and an error rate are grids too.
    """
    n = 1
    for v in map(abs, values):
        if v > 1.0:
            return None
        q = fractions.Fraction(v).limit_denominator(_MAX_GRID)
        if abs(v - q.numerator / q.denominator) > 1e-12:
            return None
        n = n * q.denominator // math.gcd(n, q.denominator)
        if n > _MAX_GRID:
            return None
    return n


def noise_floor(values, best: float, noise: float | None = None) -> float | None:
    """The noise floor ``sigma`` of the rule (module docstring), or None with fewer than 2 values.

    Args:
        values: the finite metrics seen, in any orientation.
        best: the best of them.
        noise: the floor, if the user gave one.
    """
    if noise is not None:
        return noise
    grid = _grid(values)
    if grid is not None:
        q = min(1.0, abs(best))
        return max(math.sqrt(q * (1.0 - q) / grid), 1.0 / grid)
    gaps = [b - a for a, b in itertools.pairwise(sorted(set(values)))]
    return min(gaps) if gaps else None


def expected_gain(values, rounds_left: int, best: float | None = None) -> float | None:
    """The expected gain of the best of ``rounds_left`` more rounds over ``best`` (mode "max").

    Args:
        values: the window's metrics, oriented so that higher is better; None (or a non-finite
            value) is a failed round, a draw below every other.
        rounds_left: how many more rounds the budget allows, >= 0.
        best: the best so far, at least the window's best (default: the window's best).

    Returns:
        The integral of the module docstring, with ``h = len(values)``, ``c = k / h`` and
        ``q0 = c * (1 + (best - u) / S)**-k``: substituting ``y = q(x)`` it is
        ``(S / k) * c**(1 / k) * sum_{j<m} I_j``, ``I_j = integral_0^q0 (1 - y)**j y**(-1/k) dy``,
        and ``(a + j) I_j = j I_{j-1} + q0**a (1 - q0)**j`` (``a = 1 - 1/k``) sums it with
        positive terms only. 0.0 if the tail values are all equal or no round is left; None if
        fewer than two values lie in the tail.
    """
    ordered = sorted((v for v in values if v is not None and math.isfinite(v)), reverse=True)
    h = len(values)
    k = min(math.ceil(math.sqrt(h)), len(ordered) - 1)
    if k < 2:
        return None
    if rounds_left < 1:
        return 0.0
    threshold = ordered[k]
    excess = math.fsum(v - threshold for v in ordered[:k])
    if excess <= 0.0:
        return 0.0
    top = ordered[0] if best is None else best
    _require(top >= ordered[0], "best", f"best must be at least the window's best, got {best!r}.")
    a = 1.0 - 1.0 / k
    q0 = (k / h) * (1.0 + (top - threshold) / excess) ** -k
    edge = q0**a
    term = edge / a
    total = [term]
    for j in range(1, rounds_left):
        term = (j * term + edge * (1.0 - q0) ** j) / (a + j)
        total.append(term)
    return (excess / k) * (k / h) ** (1.0 / k) * math.fsum(total)


def window(n: int) -> int:
    """How many of the last rounds the tail is fitted to after ``n`` rounds: ``ceil(n / 2)``."""
    return math.ceil(n / 2)


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
            f"the gain state stopped at round {state.round} ({state.reason}); "
            "start a new one with gain.init(...)."
        )
    value = metric_to_float(metric)
    round_index, finite = state.round, math.isfinite(value)
    if not finite and state.nonfinite == "stop":
        return dataclasses.replace(
            state, round=round_index + 1, improved=False, stopped=True, reason="nonfinite"
        )
    sign = 1.0 if state.mode == "max" else -1.0
    improved = finite and (state.best is None or sign * value > sign * state.best)
    state = dataclasses.replace(
        state,
        round=round_index + 1,
        values=(*state.values, value if finite else None),
        best=value if improved else state.best,
        best_round=round_index if improved else state.best_round,
        improved=improved,
    )
    oriented = [None if v is None else sign * v for v in state.values]
    finite_values = [v for v in oriented if v is not None]
    top = None if state.best is None else sign * state.best
    floor = None if top is None else noise_floor(finite_values, top, state.noise)
    recent = oriented[len(oriented) - window(state.round) :]
    gain = None if top is None else expected_gain(recent, state.rounds - state.round, top)
    state = dataclasses.replace(state, gain=gain, floor=floor)
    rounds = state.rounds
    judged = gain is not None and floor is not None and state.round >= state.warmup
    if judged and state.round < rounds and gain < floor:
        return dataclasses.replace(state, stopped=True, reason="gain")
    if state.extend and state.round >= rounds and rounds < state.max_rounds and floor is not None:
        next_gain = expected_gain(recent, 1, top)
        if next_gain is not None and next_gain >= floor:
            rounds += 1
    if state.round >= rounds:
        reason = "max_rounds" if state.round >= state.max_rounds else "budget"
        return dataclasses.replace(state, rounds=rounds, stopped=True, reason=reason)
    return dataclasses.replace(state, rounds=rounds)
