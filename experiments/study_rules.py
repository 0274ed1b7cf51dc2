"""Every stopping rule of the tolerance study, replayed on a cached sequence of round metrics.

A rule sees the validation metrics of rounds 0, 1, ... in order (``None`` or NaN: a failed
round) and answers how many rounds it runs. The kept instance is then the first round with the
best validation metric among those rounds, as in ``rounds.run``. The patent rule and ``gain``
are replayed with jaxes' own ``stopping`` and ``gain`` modules; the peers are reimplemented from
their source (cited below), without installing them.

Mode "max" throughout (the study monitors validation accuracy).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from jaxes import gain, stopping


def _metric(value) -> float:
    return math.nan if value is None else float(value)


def kept_round(val: Sequence, used: int) -> int | None:
    """The first round with the best finite validation metric among the first ``used``."""
    best = None
    for t in range(min(used, len(val))):
        v = _metric(val[t])
        if math.isfinite(v) and (best is None or v > _metric(val[best])):
            best = t
    return best


def run_state(state, update_fn, val: Sequence) -> tuple[int, object]:
    """Feeds ``val`` to a stopping state until it stops; returns (rounds used, final state)."""
    for t, value in enumerate(val):
        state = update_fn(state, _metric(value))
        if state.stopped:
            return t + 1, state
    raise ValueError(f"the cached sequence of {len(val)} rounds ended before the rule stopped.")


def fixed_budget(val: Sequence, n: int) -> int:
    """Run ``n`` rounds and keep the best: what most users do."""
    return n


def fixed_patience(val: Sequence, budget: int, patience: int) -> int:
    """Keras-style: stop after ``patience`` rounds in a row without a strict improvement.

    Ties count as no improvement (``ties_reset=False``); the budget caps the run.
    """
    state = stopping.init(budget, patience=patience, ties_reset=False, extend=False)
    return run_state(state, stopping.update, val)[0]


def patent_distribution(budget: int, ratio: float) -> list[tuple[int, float]]:
    """The exact law of the claim-3 tolerance: (patience, probability) pairs.

    ``patience = max(1, floor(u * ratio * R + 0.5))`` with ``u = exp(r)`` uniform on (0, 1]
    (``keys.tolerance_r`` and ``stopping.draw_r`` both draw ``r = ln(u)``), so patience ``j``
    has the probability of ``u`` in ``[(j - 0.5) / c, (j + 0.5) / c)``, ``c = ratio * R``,
    clipped to (0, 1]. The draws are independent of the sequence, so a rule's expected outcome
    is the probability-weighted mean over these patiences.
    """
    c = ratio * budget
    top = stopping.patience_from(budget, ratio, 0.0)
    out = []
    for j in range(1, top + 1):
        low = 0.0 if j == 1 else (j - 0.5) / c
        high = 1.0 if j == top else min(1.0, (j + 0.5) / c)
        if high > low:
            out.append((j, high - low))
    return out


def patent(val: Sequence, budget: int, patience: int, ratio: float, extend: bool) -> int:
    """The patent's rule (claims 1, 3-5) at one drawn patience, exactly as ``rounds.run``."""
    state = stopping.init(budget, patience=patience, ratio=ratio, extend=extend)
    return run_state(state, stopping.update, val)[0]


def optuna_stagnation(val: Sequence, budget: int, max_stagnation: int = 30,
                      min_n_trials: int = 20) -> int:  # fmt: skip
    """Optuna's ``Terminator(BestValueStagnationEvaluator(max_stagnation))`` as a callback.

    From optuna/optuna ``optuna/terminator/improvement/evaluator.py`` (commit 3075be0):
    over COMPLETE trials, ``best_step`` is the first index of the best value (strictly better
    replaces it) and the improvement is ``max_stagnation - (current_step - best_step)``.
    ``optuna/terminator/terminator.py`` pairs this evaluator with ``StaticErrorEvaluator(0)``
    and terminates when ``improvement < error``, never before ``min_n_trials`` (default
    ``DEFAULT_MIN_N_TRIALS = 20``) complete trials; ``optuna/terminator/callback.py`` checks
    after every trial. A failed round is not COMPLETE: it uses a round but is not counted.
    """
    complete: list[float] = []
    best_step = 0
    for t in range(budget):
        v = _metric(val[t])
        if not math.isfinite(v):
            continue
        complete.append(v)
        if v > complete[best_step]:
            best_step = len(complete) - 1
        if len(complete) >= min_n_trials:
            improvement = max_stagnation - (len(complete) - 1 - best_step)
            if improvement < 0:
                return t + 1
    return budget


def _percentile(values: Sequence[float], q: float) -> float:
    """``numpy.percentile`` with its default linear interpolation, in plain Python."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def ax_improvement(val: Sequence, budget: int, window: int = 5, bar: float = 0.1,
                   min_trials: int = 5) -> int:  # fmt: skip
    """Ax's ``ImprovementGlobalStoppingStrategy`` for one objective, checked after each round.

    From facebook/Ax ``ax/global_stopping/strategies/improvement.py`` (commit b4a6b40): no
    decision before ``max(min_trials, window_size)`` completed trials or with at most one
    feasible one; then, with the running optimum over completed trials,
    ``|(running_optimum[-1] - running_optimum[-window_size]) / IQR| < improvement_bar`` stops,
    the IQR being ``np.percentile(objectives, [75, 25])`` of the completed trials. An IQR of 0
    divides to inf or NaN in NumPy, and neither is below the bar, so it never stops there.
    ``min_trials`` has no default in Ax; the study uses the window size.
    """
    completed: list[float] = []
    running: list[float] = []
    for t in range(budget):
        v = _metric(val[t])
        if not math.isfinite(v):
            continue
        completed.append(v)
        running.append(v if not running else max(running[-1], v))
        if len(completed) < max(min_trials, window) or len(completed) <= 1:
            continue
        iqr = _percentile(completed, 75) - _percentile(completed, 25)
        if iqr == 0:
            continue
        if abs((running[-1] - running[-window]) / iqr) < bar:
            return t + 1
    return budget


def gain_rule(val: Sequence, budget: int, **kwargs) -> int:
    """jaxes' value-aware stop (``jaxes.gain``) at its defaults, exactly as ``rounds.run``."""
    return run_state(gain.init(budget, mode="max", **kwargs), gain.update, val)[0]
