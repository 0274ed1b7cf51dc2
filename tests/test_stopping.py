"""Tests for jaxes.stopping: hand-worked sequences, properties and bad input."""

import fractions
import json
import math
import operator
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxes import stopping

FAST = settings(max_examples=75, deadline=None)
NAN, INF = math.nan, math.inf


def run(kwargs, metrics):
    """Feeds the metrics in order and returns the state after each update."""
    state, states = stopping.init(**kwargs), []
    for metric in metrics:
        state = stopping.update(state, metric)
        states.append(state)
    return states


# Each case: name, init kwargs, metrics, streak after each update, final best, final best_round,
# final reason (None: still running), and optional per-update expectations for other fields.
# Worked by hand from the rules in docs/design.md §3; metrics are dyadic so every sum is exact.
FIXED = {"rounds": 20, "extend": False}
CASES = [
    ("tie resets (claim 4)", {**FIXED, "patience": 2}, [1, 0, 1, 0, 0],
     [0, 1, 0, 1, 2], 1.0, 0, "patience", {}),
    ("tie counts with ties_reset=False", {**FIXED, "patience": 2, "ties_reset": False}, [1, 0, 1],
     [0, 1, 2], 1.0, 0, "patience", {}),
    ("min_delta boundary is not an improvement", {**FIXED, "patience": 3, "min_delta": 0.5,
     "ties_reset": False}, [1.0, 1.5, 1.75, 2.0, 2.5],
     [0, 1, 0, 1, 0], 2.5, 4, None, {"improved": [True, False, True, False, True]}),
    ("within min_delta above the best resets but keeps the best", {**FIXED, "patience": 3,
     "min_delta": 0.5}, [1.0, 1.5, 1.25, 0.5],
     [0, 0, 0, 1], 1.0, 0, None, {"best": [1.0, 1.0, 1.0, 1.0]}),
    ("min_rel_delta uses |best| with negative metrics", {**FIXED, "patience": 3,
     "min_rel_delta": 0.5, "ties_reset": False}, [-4.0, -2.0, -1.5, -0.75],
     [0, 1, 0, 1], -1.5, 2, None, {}),
    ("mode min, min_rel_delta, negative metrics", {**FIXED, "patience": 3, "mode": "min",
     "min_rel_delta": 0.5, "ties_reset": False}, [-2.0, -2.5, -3.0, -4.5],
     [0, 1, 2, 0], -4.5, 3, None, {}),
    ("mode min, tie and worse", {**FIXED, "patience": 2, "mode": "min"}, [3, 2, 2, 5, 5],
     [0, 0, 0, 1, 2], 2.0, 1, "patience", {}),
    ("baseline: improvements below it still add to the streak", {**FIXED, "patience": 3,
     "baseline": 0.5}, [0.25, 0.375, 0.75, 0.5, 0.75],
     [1, 2, 0, 1, 0], 0.75, 2, None, {"improved": [True, True, True, False, False]}),
    ("baseline: a tie that does not beat it adds", {**FIXED, "patience": 2, "baseline": 1.0},
     [0.5, 0.5], [1, 2], 0.5, 0, "patience", {}),
    ("warmup rounds never add to the streak", {**FIXED, "patience": 1, "warmup": 2},
     [1.0, 0.0, 0.5], [0, 0, 1], 1.0, 0, "patience", {}),
    ("warmup rounds can set the best", {**FIXED, "patience": 1, "warmup": 2}, [0.0, 1.0, 1.0],
     [0, 0, 0], 1.0, 1, None, {}),
    ("target stops after judging", {**FIXED, "patience": 5, "target": 0.75}, [0.5, 0.75],
     [0, 0], 0.75, 1, "target", {"improved": [True, True]}),
    ("target reached by a round within min_delta of the best", {**FIXED, "patience": 5,
     "target": 0.5, "min_delta": 0.5}, [0.25, 0.5], [0, 0], 0.25, 0, "target",
     {"improved": [True, False]}),
    ("mode min target", {**FIXED, "patience": 5, "mode": "min", "target": 0.125},
     [0.5, 0.25, 0.125], [0, 0, 0], 0.125, 2, "target", {}),
    ("non-finite is worse and never best", {**FIXED, "patience": 2}, [NAN, 1.0, INF, NAN],
     [1, 0, 1, 2], 1.0, 1, "patience", {"improved": [False, True, False, False]}),
    ("-inf is worse in mode min", {**FIXED, "patience": 2, "mode": "min"}, [-INF, 3.0, -INF],
     [1, 0, 1], 3.0, 1, None, {}),
    ("non-finite with a target never reaches it", {**FIXED, "patience": 3, "target": 1.0},
     [0.5, INF], [0, 1], 0.5, 0, None, {}),
    ("nonfinite=stop stops at once", {**FIXED, "patience": 5, "nonfinite": "stop"},
     [1.0, 2.0, INF], [0, 0, 0], 2.0, 1, "nonfinite", {"round": [1, 2, 3]}),
    ("nonfinite=stop on the first round", {**FIXED, "patience": 5, "nonfinite": "stop"}, [NAN],
     [0], None, None, "nonfinite", {}),
    ("extension up to max_rounds, improving on the last round", {"rounds": 4, "patience": 3},
     [1, 2, 3, 4, 5, 6, 7, 8], [0] * 8, 8.0, 7, "max_rounds",
     {"rounds": [4, 5, 6, 7, 8, 8, 8, 8], "improved": [True] * 8}),
    ("extension capped by an explicit max_rounds", {"rounds": 4, "patience": 3, "max_rounds": 6},
     [1, 2, 3, 4, 5, 6], [0] * 6, 6.0, 5, "max_rounds", {"rounds": [4, 5, 6, 6, 6, 6]}),
    ("extension, then patience", {"rounds": 4, "patience": 3}, [1, 0, 0, 0],
     [0, 1, 2, 3], 1.0, 0, "patience", {"rounds": [4, 5, 6, 6]}),
    ("no extension: the budget stops", {"rounds": 4, "patience": 3, "extend": False},
     [1, 2, 3, 4], [0] * 4, 4.0, 3, "budget", {"rounds": [4] * 4}),
    ("no extension, budget equal to max_rounds", {"rounds": 2, "patience": 3, "extend": False,
     "max_rounds": 2}, [1, 0], [0, 1], 1.0, 0, "max_rounds", {}),
]  # fmt: skip


@pytest.mark.parametrize(
    ("kwargs", "metrics", "streaks", "best", "best_round", "reason", "per_update"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_hand_worked_sequence(kwargs, metrics, streaks, best, best_round, reason, per_update):
    states = run(kwargs, metrics)
    assert [s.streak for s in states] == streaks
    assert [s.round for s in states] == list(range(1, len(metrics) + 1))
    final = states[-1]
    assert (final.best, final.best_round, final.reason) == (best, best_round, reason)
    assert [s.stopped for s in states] == [False] * (len(metrics) - 1) + [reason is not None]
    for field, expected in per_update.items():
        assert [getattr(s, field) for s in states] == expected, field


def test_patience_from_claim_3_example():
    # exp(-0.4) * 0.8 * 30 = 16.09 -> 16 (the acceptance example).
    assert stopping.patience_from(rounds=30, ratio=0.8, r=-0.4) == 16
    assert stopping.init(rounds=30, ratio=0.8, r=-0.4).patience == 16
    assert stopping.patience_from(rounds=30, ratio=0.8, r=0.0) == 24
    assert stopping.patience_from(rounds=30, ratio=0.8, r=-50.0) == 1
    # 0.5 * 5 = 2.5 exactly: halves round up (floor(x + 0.5)), not to even as round() would.
    assert stopping.patience_from(rounds=5, ratio=0.5, r=0.0) == 3


def test_update_on_stopped_state_raises():
    state = run({"rounds": 5, "patience": 1}, [1.0, 0.0])[-1]
    assert state.stopped
    with pytest.raises(stopping.StoppedError, match="stopped"):
        stopping.update(state, 1.0)
    assert issubclass(stopping.StoppedError, RuntimeError)


def test_numpy_and_fraction_metrics_are_real_numbers():
    state = stopping.init(rounds=np.int64(5), patience=np.int32(2), ratio=np.float32(0.75))
    for metric in (np.float32(0.5), np.int64(1), fractions.Fraction(3, 2), np.float64(NAN)):
        state = stopping.update(state, metric)
    assert state.best == 1.5 and type(state.best) is float and state.best_round == 2
    assert type(state.rounds) is int and type(state.ratio) is float
    assert stopping.State.from_dict(json.loads(json.dumps(state.to_dict()))) == state


@pytest.mark.parametrize("metric", ["0.5", None, True, 1 + 0j, [1.0], np.array([1.0])])
def test_non_real_metric_raises_type_error(metric):
    with pytest.raises(TypeError, match="metric"):
        stopping.update(stopping.init(rounds=5, patience=2), metric)


BAD_ARGUMENTS = [
    ({"rounds": 0}, "rounds"),
    ({"rounds": 2.0}, "rounds"),
    ({"rounds": True}, "rounds"),
    ({"patience": 0}, "patience"),
    ({"patience": 2.0}, "patience"),
    ({"patience": True}, "patience"),
    ({"warmup": -1}, "warmup"),
    ({"warmup": 1.0}, "warmup"),
    ({"max_rounds": 9}, "max_rounds"),
    ({"max_rounds": 20.0}, "max_rounds"),
    ({"ratio": 0.0}, "ratio"),
    ({"ratio": 1.01}, "ratio"),
    ({"ratio": NAN}, "ratio"),
    ({"ratio": "0.8"}, "ratio"),
    ({"r": 0.1}, "r must"),
    ({"r": NAN}, "r must"),
    ({"r": -INF}, "r must"),
    ({"r": False}, "r must"),
    ({"seed": 1.5}, "seed"),
    ({"min_delta": -0.1}, "min_delta"),
    ({"min_delta": NAN}, "min_delta"),
    ({"min_rel_delta": -1.0}, "min_rel_delta"),
    ({"min_rel_delta": NAN}, "min_rel_delta"),
    ({"baseline": NAN}, "baseline"),
    ({"target": NAN}, "target"),
    ({"baseline": INF}, "baseline"),
    ({"mode": "maximize"}, "mode"),
    ({"nonfinite": "ignore"}, "nonfinite"),
    ({"ties_reset": 1}, "ties_reset"),
    ({"extend": "yes"}, "extend"),
    ({"patience": 3, "r": -0.1}, "patience, r"),
    ({"r": -0.1, "seed": 3}, "r, seed"),
]


@pytest.mark.parametrize(("overrides", "name"), BAD_ARGUMENTS)
def test_bad_argument_names_itself(overrides, name):
    kwargs = {"rounds": 10, **overrides}
    with pytest.raises(ValueError, match=r"must|at most") as error:
        stopping.init(**kwargs)
    assert name in str(error.value)


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: stopping.patience_from(0, 0.8, -0.1), "rounds"),
        (lambda: stopping.patience_from(10, 1.5, -0.1), "ratio"),
        (lambda: stopping.patience_from(10, 0.8, 0.5), "r must"),
        (lambda: stopping.draw_r(1.5), "seed"),
        (lambda: stopping.draw_r(None), "seed"),
        (lambda: stopping.draw_r(-7), "seed"),
    ],
)
def test_bad_helper_argument_names_itself(call, name):
    with pytest.raises(ValueError) as error:
        call()
    assert name in str(error.value)


def test_from_dict_refuses_missing_fields_and_bad_values():
    data = stopping.init(rounds=10, patience=3).to_dict()
    with pytest.raises(ValueError, match="missing \\['streak'\\]"):
        stopping.State.from_dict({k: v for k, v in data.items() if k != "streak"})
    with pytest.raises(ValueError, match="patience"):
        stopping.State.from_dict({**data, "patience": 0})


def test_entropy_draw_is_recorded():
    state = stopping.init(rounds=30)
    assert state.seed is None and isinstance(state.r, float) and state.r <= 0
    assert state.patience == stopping.patience_from(30, 0.8, state.r)
    resumed = stopping.State.from_dict(json.loads(json.dumps(state.to_dict())))
    assert (resumed.r, resumed.patience) == (state.r, state.patience)


def test_import_leaves_out_jax_and_numpy():
    code = (
        "import sys, jaxes.stopping\n"
        "heavy = sorted({'jax', 'numpy'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---------------------------------------------------------------- properties

ratios = st.floats(min_value=0.0, max_value=1.0, exclude_min=True)
log_weights = st.floats(max_value=0.0, allow_nan=False, allow_infinity=False)
# Dyadic metrics (multiples of 1/4) keep every comparison exact, plus the non-finite values.
exact_metrics = st.integers(-12, 12).map(lambda k: k / 4)
metrics = st.one_of(
    exact_metrics, st.floats(-1e6, 1e6), st.integers(-5, 5), st.sampled_from([NAN, INF, -INF])
)


@st.composite
def configs(draw, extend=None):
    rounds = draw(st.integers(1, 12))
    kwargs = {
        "rounds": rounds,
        "mode": draw(st.sampled_from(["max", "min"])),
        "min_delta": draw(st.sampled_from([0.0, 0.25, 0.5])),
        "min_rel_delta": draw(st.sampled_from([0.0, 0.1, 0.5])),
        "ties_reset": draw(st.booleans()),
        "warmup": draw(st.integers(0, 3)),
        "baseline": draw(st.none() | exact_metrics),
        "target": draw(st.none() | exact_metrics),
        "nonfinite": draw(st.sampled_from(["worse", "stop"])),
        "extend": draw(st.booleans()) if extend is None else extend,
        "max_rounds": draw(st.none() | st.integers(rounds, 3 * rounds)),
    }
    source = draw(st.sampled_from(["patience", "r", "seed"]))
    kwargs[source] = draw(
        {"patience": st.integers(1, 6), "r": log_weights, "seed": st.integers(0, 2**64)}[source]
    )
    return kwargs


def run_until_stopped(kwargs, sequence):
    """Like run(), but ends at the stop instead of raising StoppedError."""
    state, states = stopping.init(**kwargs), []
    for metric in sequence:
        if state.stopped:
            break
        state = stopping.update(state, metric)
        states.append(state)
    return states


@FAST
@given(rounds=st.integers(1, 100_000), ratio=ratios, r=log_weights)
def test_patience_formula_range_and_determinism(rounds, ratio, r):
    patience = stopping.patience_from(rounds, ratio, r)
    assert type(patience) is int
    assert 1 <= patience <= max(1, math.floor(ratio * rounds + 0.5))
    assert patience == stopping.patience_from(rounds, ratio, r)
    assert stopping.init(rounds, ratio=ratio, r=r).patience == patience


@FAST
@given(seed=st.integers(0, 2**70))
def test_draw_r_is_deterministic_and_not_positive(seed):
    r = stopping.draw_r(seed)
    assert math.isfinite(r) and r <= 0
    assert stopping.draw_r(seed) == r
    assert stopping.draw_r(np.int64(seed % 2**63)) == stopping.draw_r(seed % 2**63)
    state = stopping.init(30, seed=seed)
    assert (state.r, state.seed) == (r, seed)
    assert state.patience == stopping.patience_from(30, 0.8, r)


@FAST
@given(kwargs=configs(), sequence=st.lists(metrics, max_size=30))
def test_json_round_trip_is_exact_at_every_point(kwargs, sequence):
    plain = restored = stopping.init(**kwargs)
    for metric in [None, *sequence]:
        if metric is not None:
            if plain.stopped:
                break
            plain, restored = stopping.update(plain, metric), stopping.update(restored, metric)
        text = json.dumps(restored.to_dict(), allow_nan=False)
        restored = stopping.State.from_dict(json.loads(text))
        assert restored == plain
        assert json.dumps(restored.to_dict(), allow_nan=False) == text


def keras_reference(sequence, patience, min_delta, mode):
    """Keras EarlyStopping.on_epoch_end (keras/src/callbacks/early_stopping.py), as a loop.

    Returns the epoch at which it stops (None if it never does) and the best epoch. Keras also
    requires ``epoch > 0`` to stop; it is left out so that a NaN first epoch with patience 1
    stops at once, as jaxes does (the only case where the guard matters with patience >= 1).
    """
    monitor_op = operator.gt if mode == "max" else operator.lt
    delta = min_delta if mode == "max" else -min_delta
    best = -math.inf if mode == "max" else math.inf
    wait, best_epoch = 0, None
    for epoch, current in enumerate(sequence):
        wait += 1
        if monitor_op(current - delta, best):
            best, best_epoch, wait = current, epoch, 0
            continue
        if wait >= patience:
            return epoch, best_epoch
    return None, best_epoch


@FAST
@given(
    sequence=st.lists(exact_metrics | st.just(NAN), min_size=1, max_size=30),
    patience=st.integers(1, 6),
    min_delta=st.sampled_from([0.0, 0.25, 0.5, 1.0]),
    mode=st.sampled_from(["max", "min"]),
)
def test_ties_reset_false_matches_keras(sequence, patience, min_delta, mode):
    kwargs = {"rounds": len(sequence), "patience": patience, "min_delta": min_delta, "mode": mode}
    states = run_until_stopped({**kwargs, "ties_reset": False, "extend": False}, sequence)
    final = states[-1]
    stop_epoch = final.round - 1 if final.reason == "patience" else None
    assert (stop_epoch, final.best_round) == keras_reference(sequence, patience, min_delta, mode)


@FAST
@given(kwargs=configs(), sequence=st.lists(metrics, min_size=1, max_size=30))
def test_best_is_first_extreme_of_finite_metrics(kwargs, sequence):
    kwargs = {**kwargs, "min_delta": 0.0, "min_rel_delta": 0.0}
    extreme = max if kwargs["mode"] == "max" else min
    for count, state in enumerate(run_until_stopped(kwargs, sequence), start=1):
        seen = [float(m) for m in sequence[:count]]
        finite = [m for m in seen if math.isfinite(m)]
        if not finite:
            assert (state.best, state.best_round) == (None, None)
            continue
        assert state.best == extreme(finite)
        assert state.best_round == seen.index(extreme(finite))


@FAST
@given(kwargs=configs(extend=True), sequence=st.lists(metrics, min_size=1, max_size=40))
def test_extension_keeps_the_tolerance_window_open(kwargs, sequence):
    for state in run_until_stopped(kwargs, sequence):
        if state.stopped:
            assert state.reason != "budget"
        else:
            window = min(state.patience, state.max_rounds - state.round)
            assert state.rounds - state.round >= window
            assert state.rounds <= state.max_rounds


def test_an_int_too_large_for_a_float_counts_as_an_infinity():
    state = stopping.update(stopping.init(rounds=5, patience=2), 0.5)
    for huge in (10**400, -(10**400)):
        after = stopping.update(state, huge)  # non-finite: never the best, below it
        assert after.best == 0.5 and after.streak == 1 and not after.improved
