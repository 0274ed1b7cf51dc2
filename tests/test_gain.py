"""Tests for jaxes.gain: hand-worked sequences, properties and bad input."""

import json
import math
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxes import gain, stopping

FAST = settings(max_examples=75, deadline=None)
NAN, INF = math.nan, math.inf
E = math.e


def run(kwargs, metrics):
    """Feeds the metrics in order and returns the state after each update."""
    state, states = gain.init(**kwargs), []
    for metric in metrics:
        state = gain.update(state, metric)
        states.append(state)
    return states


def mean_excess_of_max(values, m, best):
    """E[(max of m draws - best)+] under the predictive tail, by the midpoint rule.

    An independent route to ``expected_gain``: it integrates the survival function of the
    maximum, ``1 - (1 - q(x))**m`` with ``q(x) = (k / h) * (1 + (d + x) / S)**-k``, over
    ``x = S * t / (1 - t)``, instead of the closed-form recurrence.
    """
    ordered = sorted((v for v in values if v is not None), reverse=True)
    h = len(values)
    k = min(math.ceil(math.sqrt(h)), len(ordered) - 1)
    u = ordered[k]
    s = sum(v - u for v in ordered[:k])
    d = best - u
    steps, total = 20_000, 0.0
    for i in range(steps):
        t = (i + 0.5) / steps
        x, dx = s * t / (1 - t), s / (1 - t) ** 2 / steps
        total += (1 - (1 - (k / h) * (1 + (d + x) / s) ** -k) ** m) * dx
    return total


# Each case: name, init kwargs, metrics, final round, reason (None: running), best_round,
# budget after each update. Worked by hand from the rule in the module docstring: the tail is
# fitted to the last ceil(n / 2) rounds and needs 3 finite values there, so from round 5 on.
CASES = [
    ("a flat top has no gain: stop at once", {"rounds": 10, "noise": 0.1, "warmup": 3},
     [0.5] * 5, 5, "gain", 0, [10] * 5),
    ("no estimate before round 5, even with warmup 1", {"rounds": 10, "noise": 0.1, "warmup": 1},
     [0.5] * 5, 5, "gain", 0, [10] * 5),
    # The default warmup is max(3, ceil(rounds / e)): ceil(20 / e) = 8, ceil(30 / e) = 12.
    ("default warmup: the flat top waits for ceil(20 / e) rounds", {"rounds": 20, "noise": 0.1},
     [0.5] * 8, 8, "gain", 0, [20] * 8),
    ("default warmup: ceil(30 / e) = 12 rounds", {"rounds": 30, "noise": 0.1},
     [0.5] * 12, 12, "gain", 0, [30] * 12),
    # Round 5: window [3, 4, 5], k = 2 over u = 3, S = 3, d = 2; one more round gains
    # (k / h) * S / (k - 1) * (1 + d / S)**-(k - 1) = (2/3) * 3 * 3/5 = 1.2 < 2: no extension.
    ("budget reached, the next round is not worth its noise", {"rounds": 5, "noise": 2.0},
     [1, 2, 3, 4, 5], 5, "budget", 4, [5] * 5),
    # The same window after [0, 0, 3, 4, 5], one round left: 1.2 < 1.5, a stop. Fitted to every
    # round the tail would be wider: k = 3 over u = 0, S = 12: (3/5) * 12/2 * (17/12)**-2 = 1.79.
    ("the tail is the recent half: early rounds do not widen it",
     {"rounds": 6, "noise": 1.5, "warmup": 1}, [0, 0, 3, 4, 5], 5, "gain", 4, [6] * 5),
    ("no extension with extend=False", {"rounds": 5, "noise": 1e-9, "extend": False},
     [1, 2, 3, 4, 5], 5, "budget", 4, [5] * 5),
    # Next-round gains by the same formula: round 5: 1.2; round 6, window [4, 5, 0]: u = 0,
    # S = 9, d = 5: (2/3) * 9 * 9/14 = 3.86; round 7, [4, 5, 0, 0]: (2/4) * 9 * 9/14 = 2.89;
    # round 8, [5, 0, 0, 0]: S = 5: (2/4) * 5 * 1/2 = 1.25; round 9, [5, 0, 0, 0, 0]: k = 3:
    # (3/5) * 5/2 * (1/2)**2 = 0.375; each >= 0.1: extend, up to max_rounds = 10.
    ("extends one round at a time up to max_rounds", {"rounds": 5, "noise": 0.1},
     [1, 2, 3, 4, 5, 0, 0, 0, 0, 0], 10, "max_rounds", 4, [5, 5, 5, 5, 6, 7, 8, 9, 10, 10]),
    # Rounds 5 and 6: the window [inf, -inf, 1] then [inf, 1, 1] has too few finite values;
    # round 7: [-inf, 1, 1, 1], k = 2 over u = 1: a flat top.
    ("non-finite rounds count as draws, never best", {"rounds": 10, "noise": 0.1, "warmup": 3},
     [NAN, 1.0, INF, -INF, 1.0, 1.0, 1.0], 7, "gain", 1, [10] * 7),
    ("nonfinite=stop stops at once", {"rounds": 10, "nonfinite": "stop"},
     [1.0, NAN], 2, "nonfinite", 0, [10, 10]),
    ("mode min: the lowest is best", {"rounds": 10, "noise": 0.1, "mode": "min", "warmup": 3},
     [3.0, 2.0, 2.0, 2.0, 2.0], 5, "gain", 1, [10] * 5),
]  # fmt: skip


@pytest.mark.parametrize(("name", "kwargs", "metrics", "final_round", "reason", "best_round",
                          "budgets"), CASES, ids=[c[0] for c in CASES])  # fmt: skip
def test_hand_worked_sequences(name, kwargs, metrics, final_round, reason, best_round, budgets):
    states = run(kwargs, metrics)
    final = states[-1]
    assert final.round == final_round == len(metrics)
    assert final.reason == reason
    assert final.stopped == (reason is not None)
    assert all(not s.stopped for s in states[:-1])
    assert final.best_round == best_round
    assert [s.rounds for s in states] == budgets


def test_mode_min_case_gain_is_zero_on_a_flat_top():
    # [3, 2, 2, 2, 2] in mode min: the window's top values 2, 2 over the threshold 2: S = 0.
    final = run({"rounds": 10, "noise": 0.1, "mode": "min"}, [3.0, 2.0, 2.0, 2.0, 2.0])[-1]
    assert final.gain == 0.0
    assert final.best == 2.0
    assert final.values == (3.0, 2.0, 2.0, 2.0, 2.0)


def test_expected_gain_by_hand():
    # [3, 4, 5]: k = 2 over u = 3, S = 3. One round: integral of q = (k/h) S/(k-1) (1+d/S)^-(k-1).
    assert gain.expected_gain([3.0, 4.0, 5.0], 1) == pytest.approx(1.2, rel=1e-12)
    assert gain.expected_gain([3.0, 4.0, 5.0], 1, best=6.0) == pytest.approx(1.0, rel=1e-12)
    # Two rounds: integral of 2q - q^2, and q^2 integrates to (k/h)^2 S/(2k-1) (1+d/S)^-(2k-1).
    two = 2 * 1.2 - (2 / 3) ** 2 * 3 / 3 * (3 / 5) ** 3
    assert gain.expected_gain([3.0, 4.0, 5.0], 2) == pytest.approx(two, rel=1e-12)
    # A failed round is a draw: h = 4 halves nothing of the tail but lowers k / h.
    assert gain.expected_gain([None, 3.0, 4.0, 5.0], 1) == pytest.approx(2 / 4 * 3 * 3 / 5)


def test_expected_gain_edges():
    assert gain.expected_gain([0.5, 0.7], 5) is None  # k = 1: no finite mean yet
    assert gain.expected_gain([None, 0.5, 0.7, None], 5) is None  # two finite values
    assert gain.expected_gain([0.5, 0.6, 0.7], 0) == 0.0  # no rounds left
    assert gain.expected_gain([0.7, 0.7, 0.7, 0.5], 5) == 0.0  # a flat top: k=2, u=0.7
    with pytest.raises(ValueError, match="best must be at least"):
        gain.expected_gain([0.5, 0.6, 0.7], 3, best=0.6)
    assert [gain.window(n) for n in (1, 2, 5, 20)] == [1, 1, 3, 10]


@FAST
@given(
    st.lists(st.one_of(st.integers(0, 1000).map(lambda i: i / 1000), st.none()), min_size=3,
             max_size=40),
    st.integers(1, 60),
    st.integers(0, 100).map(lambda i: i / 1000),
)  # fmt: skip
def test_expected_gain_matches_the_integral_of_the_maximum(values, m, above):
    finite = sorted((v for v in values if v is not None), reverse=True)
    got = gain.expected_gain(values, m, best=None if not finite else finite[0] + above)
    k = min(math.ceil(math.sqrt(len(values))), len(finite) - 1)
    if k < 2:
        assert got is None
    elif finite[0] == finite[k]:
        assert got == 0.0
    else:
        assert got == pytest.approx(mean_excess_of_max(values, m, finite[0] + above), rel=1e-4)
        assert got <= gain.expected_gain(values, m + 1, best=finite[0] + above)


def test_noise_floor_of_an_accuracy_grid():
    # Quarters: N = 4; the binomial error at 0.75 is 0.2165, below the grid step 1/4.
    assert gain.noise_floor([0.5, 0.25, 0.75], 0.75) == 0.25
    # 359 validation images (digits): the binomial standard error at the best.
    values = [350 / 359, 340 / 359, 1 / 359]
    q = 350 / 359
    assert gain.noise_floor(values, q) == pytest.approx(math.sqrt(q * (1 - q) / 359), 1e-12)
    # An error rate or a negated accuracy is a grid too.
    assert gain.noise_floor([-0.5, -0.25, -0.75], -0.75) == 0.25


def test_noise_floor_fallbacks():
    assert gain.noise_floor([0.1234567, 0.2], 0.2) == pytest.approx(0.2 - 0.1234567)
    assert gain.noise_floor([-2.0, -1.0, -1.0], -1.0) == 1.0  # outside [-1, 1]: smallest gap
    assert gain.noise_floor([0.3], 0.3, noise=0.05) == 0.05
    assert gain.noise_floor([1.5], 1.5) is None  # one value, no grid, no gap


def test_stopped_state_raises_and_shares_stoppings_error():
    final = run({"rounds": 10, "noise": 0.1, "warmup": 1}, [0.5] * 5)[-1]
    with pytest.raises(stopping.StoppedError, match=r"gain\.init"):
        gain.update(final, 0.5)
    assert gain.StoppedError is stopping.StoppedError


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"rounds": 0}, "rounds must be an int >= 1"),
        ({"rounds": True}, "rounds must be an int >= 1"),
        ({"rounds": 2.0}, "rounds must be an int >= 1"),
        ({"rounds": 5, "warmup": 0}, "warmup must be an int >= 1"),
        ({"rounds": 5, "max_rounds": 4}, "max_rounds must be an int >= rounds (5)"),
        ({"rounds": 5, "noise": 0.0}, "noise must be None or a finite real number > 0"),
        ({"rounds": 5, "noise": NAN}, "noise must be None"),
        ({"rounds": 5, "noise": INF}, "noise must be None"),
        ({"rounds": 5, "mode": "up"}, "mode must be one of"),
        ({"rounds": 5, "nonfinite": "skip"}, "nonfinite must be one of"),
        ({"rounds": 5, "extend": "yes"}, "extend must be True or False"),
    ],
)
def test_bad_arguments_name_the_argument(kwargs, needle):
    with pytest.raises(ValueError, match="^" + needle.replace("(", r"\(").replace(")", r"\)")) as e:
        gain.init(**kwargs)
    # The argument travels on the error (runconfig maps it to a config path), not in its words.
    assert isinstance(e.value, stopping.ArgumentError)
    assert e.value.argument == needle.split(" ", 1)[0]


def test_bad_metric_and_bad_dict():
    state = gain.init(5)
    with pytest.raises(TypeError, match="metric must be a real number"):
        gain.update(state, "0.9")
    with pytest.raises(TypeError, match="metric must be a real number"):
        gain.update(state, True)
    d = state.to_dict()
    with pytest.raises(ValueError, match="missing \\['values'\\]"):
        gain.State.from_dict({k: v for k, v in d.items() if k != "values"})
    with pytest.raises(ValueError, match="values must be a list of finite"):
        gain.State.from_dict({**d, "values": [NAN]})
    with pytest.raises(ValueError, match=r"values must hold one entry per round \(0\), got 1"):
        gain.State.from_dict({**d, "values": [0.5]})
    with pytest.raises(ValueError, match="warmup must be"):
        gain.State.from_dict({**d, "warmup": 0})


def test_huge_int_metric_is_an_infinity():
    state = gain.update(gain.init(5), 10**400)
    assert state.best is None and state.failed == 1


def test_imports_no_jax_and_no_numpy():
    code = (
        "import sys\n"
        "from jaxes import gain\n"
        "heavy = sorted({'jax', 'numpy'} & set(sys.modules))\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# ---------------------------------------------------------------- properties

# Accuracies on 359 images (the digits validation split), plus the non-finite values.
accuracies = st.integers(0, 359).map(lambda k: k / 359)
metrics = st.one_of(accuracies, accuracies, accuracies, st.sampled_from([NAN, INF, -INF]))
configs = st.fixed_dictionaries(
    {
        "rounds": st.integers(1, 30),
        "warmup": st.one_of(st.none(), st.integers(1, 5)),
        "extend": st.booleans(),
        "noise": st.one_of(st.none(), st.floats(1e-4, 0.2)),
    }
)


def _until_stopped(kwargs, seq):
    state, states = gain.init(**kwargs), []
    for metric in seq:
        if state.stopped:
            break
        state = gain.update(state, metric)
        states.append(state)
    return states


@FAST
@given(configs, st.lists(metrics, max_size=70))
def test_json_round_trip_is_exact_at_every_point(kwargs, seq):
    for state in [gain.init(**kwargs), *_until_stopped(kwargs, seq)]:
        text = json.dumps(state.to_dict(), allow_nan=False)
        again = gain.State.from_dict(json.loads(text))
        assert again == state
        if not state.stopped:  # the restored state continues exactly as the original
            assert gain.update(again, 0.5) == gain.update(state, 0.5)


@FAST
@given(configs, st.lists(metrics, max_size=70))
def test_mode_min_on_negated_metrics_mirrors_mode_max(kwargs, seq):
    up = _until_stopped({**kwargs, "mode": "max"}, seq)
    down = _until_stopped({**kwargs, "mode": "min"}, [-m for m in seq])
    assert len(up) == len(down)
    for a, b in zip(up, down, strict=True):
        assert (a.round, a.rounds, a.stopped, a.reason, a.best_round, a.improved) == (
            b.round, b.rounds, b.stopped, b.reason, b.best_round, b.improved)  # fmt: skip
        assert (a.gain, a.floor, a.failed) == (b.gain, b.floor, b.failed)
        assert (a.best is None and b.best is None) or a.best == -b.best


@FAST
@given(configs, st.lists(metrics, max_size=70))
def test_invariants(kwargs, seq):
    states = _until_stopped(kwargs, seq)
    for i, s in enumerate(states):
        seen = [m for m in seq[: i + 1] if math.isfinite(m)]
        assert s.round == i + 1
        assert s.failed == i + 1 - len(seen)
        assert [v for v in s.values if v is not None] == seen and len(s.values) == i + 1
        if seen:  # the best is the first maximum; a non-finite metric never is
            assert s.best == max(seen) and seq[s.best_round] == s.best
            assert s.best_round == seq.index(s.best)
        else:
            assert s.best is None and s.best_round is None
        assert s.rounds <= s.max_rounds == 2 * kwargs["rounds"]
        assert kwargs["extend"] or s.rounds == kwargs["rounds"]
        assert s.round <= s.rounds
        if s.reason == "gain":
            warmup = kwargs["warmup"] or max(3, math.ceil(kwargs["rounds"] / E))
            assert s.round >= warmup == s.warmup and s.gain < s.floor and s.round < s.rounds
        assert s.stopped == (i == len(states) - 1 and s.reason is not None)
    if len(states) < len(seq):  # it stopped before the sequence ended
        assert states[-1].stopped


def test_streak_and_compatibility_fields():
    states = run({"rounds": 10, "noise": 1e-9}, [0.5, 0.75, 0.25, 0.25])
    assert [s.streak for s in states] == [0, 0, 1, 2]
    assert states[-1].patience is None and states[-1].r is None
