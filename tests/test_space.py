"""Search spaces: ranges (linear and log), conditional fields, sizes, draws, mutation, and the
strategies over them (random never exhausts a continuous space, evolution mutates in range)."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest

from jaxes import search
from jaxes import space as space_lib

LR = {"low": 1e-4, "high": 1e-2, "log": True}
COND = {
    "backbone": ("mlp", "cnn"),
    "depth": {"values": (1, 2), "when": {"backbone": "mlp"}},
    "width": {"values": (8, 16, 32), "when": {"backbone": "cnn"}},
    "embed_dim": (4, 8),
}


def _keys(n, seed=0):
    root = jax.random.key(seed)
    return [jax.random.fold_in(root, i) for i in range(n)]


def test_sizes_count_each_branch_of_a_conditional_space():
    # mlp: depth 2 x embed 2 = 4; cnn: width 3 x embed 2 = 6.
    assert space_lib.Space(COND).size == 10
    assert space_lib.Space({"depth": {"low": 1, "high": 4}, "embed_dim": (4, 8)}).size == 8
    assert space_lib.Space({**COND, "learning_rate": LR}).size == math.inf
    # A float range on one branch only still makes the space continuous.
    lr_cnn = {**LR, "when": {"backbone": "cnn"}}
    assert space_lib.Space({**COND, "learning_rate": lr_cnn}).size == math.inf


def test_draws_hold_exactly_the_active_fields_and_pass_the_check():
    space = space_lib.Space({**COND, "learning_rate": LR})
    backbones = set()
    for key in _keys(60):
        choice = space.sample(key)
        backbones.add(choice["backbone"])
        expected = {"backbone", "embed_dim", "learning_rate"}
        expected |= {"depth"} if choice["backbone"] == "mlp" else {"width"}
        assert set(choice) == expected
        assert space.check(choice) == choice
    assert backbones == {"mlp", "cnn"}


def test_log_range_draws_are_log_uniform_and_linear_ones_uniform():
    log_space = space_lib.Space({"learning_rate": LR})
    lin_space = space_lib.Space({"learning_rate": {"low": 1e-4, "high": 1e-2}})
    log_draws = np.array([log_space.sample(k)["learning_rate"] for k in _keys(400)])
    lin_draws = np.array([lin_space.sample(k)["learning_rate"] for k in _keys(400)])
    assert log_draws.min() >= 1e-4 and log_draws.max() <= 1e-2
    # Log-uniform on [1e-4, 1e-2]: half below 1e-3. Uniform: 1e-3 is at 9%.
    assert 0.4 < np.mean(log_draws < 1e-3) < 0.6
    assert np.mean(lin_draws < 1e-3) < 0.16


def test_int_ranges_cover_both_ends_evenly():
    space = space_lib.Space(
        {"depth": {"low": 1, "high": 3}, "units": {"low": 2, "high": 5, "log": True}}
    )
    draws = [space.sample(key) for key in _keys(600)]
    depths, units = [c["depth"] for c in draws], [c["units"] for c in draws]
    counts = np.bincount(depths, minlength=4)[1:]
    assert counts.min() > 150  # each of 3 values ~200 times
    assert set(units) == {2, 3, 4, 5} and all(isinstance(u, int) for u in units)


def test_a_space_of_lists_draws_what_the_plain_product_space_drew():
    # The draw the strategies made before ranges existed: one randint over the sorted fields.
    declared = {"width": (16, 24, 32), "backbone": ("mlp",), "depth": (1, 2)}
    space = space_lib.Space(declared)
    for key in _keys(20):
        fields = sorted(declared)
        sizes = [len(declared[f]) for f in fields]
        index = jax.random.randint(key, (3,), 0, np.asarray(sizes)).tolist()
        expected = {f: declared[f][i] for f, i in zip(fields, index, strict=True)}
        assert space.sample(key) == expected


def test_mutating_a_range_stays_in_range_moves_it_and_steps_in_log_scale():
    field = space_lib.parse_field("learning_rate", LR)
    ratios = []
    for key in _keys(300):
        new = field.mutate(3e-3, key)
        assert 1e-4 <= new <= 1e-2 and new != 3e-3
        ratios.append(abs(math.log10(new / 3e-3)))
    # A step of 0.25 of the two decades: median |step| ~ 0.67 * 0.5 decades (reflection aside).
    assert 0.15 < float(np.median(ratios)) < 0.6
    at_top = [field.mutate(1e-2, key) for key in _keys(50)]
    assert all(1e-4 <= v < 1e-2 for v in at_top)  # reflected back in, never stuck at the end
    ints = space_lib.parse_field("depth", {"low": 1, "high": 3})
    for key in _keys(100):
        for value in (1, 2, 3):
            new = ints.mutate(value, key)
            assert new != value and 1 <= new <= 3


def test_mutating_the_backbone_swaps_its_conditional_fields():
    space = space_lib.Space(COND)
    parent = {"backbone": "mlp", "depth": 2, "embed_dim": 4}
    swaps = 0
    for key in _keys(80):
        field_key, value_key = jax.random.split(key)
        child = space.mutate(parent, field_key, value_key)
        assert space.check(child) == child
        changed = [f for f in set(child) | set(parent) if child.get(f) != parent.get(f)]
        if child["backbone"] == "cnn":
            swaps += 1
            assert "depth" not in child and child["embed_dim"] == 4
        else:
            assert len(changed) == 1
    assert swaps > 10


@pytest.mark.parametrize(
    ("declared", "field", "words"),
    [
        ({"learning_rate": {"low": 0.0, "high": 1e-2, "log": True}}, "learning_rate", "> 0"),
        ({"depth": {"low": 3, "high": 3}}, "depth", "low < high"),
        ({"depth": {"low": 1}}, "depth", "'high'"),
        ({"depth": {"low": 1, "high": 4, "step": 2}}, "depth", "'step'"),
        ({"depth": {"values": (1,), "low": 1, "high": 2}}, "depth", "keep one"),
        ({"depth": {"low": "1", "high": 4}}, "depth", "finite numbers"),
        ({"depth": {"values": (1, 2), "when": {"backbone": "mlp"}}}, "depth", "backbone"),
        ({"backbone": ("mlp",), "depth": {"values": (1,), "when": {"backbone": "rnn"}}}, "depth",
         "'rnn'"),
        ({"backbone": ("mlp",), "depth": {"values": (1,), "when": "mlp"}}, "depth", "map a field"),
    ],
)  # fmt: skip
def test_bad_declarations_name_the_field_and_the_fix(declared, field, words):
    with pytest.raises(search.SearchError, match=words) as error:
        space_lib.Space(declared)
    assert error.value.field == field
    assert f"'{field}'" in str(error.value)


def test_check_rejects_a_field_that_does_not_apply():
    space = space_lib.Space(COND)
    with pytest.raises(search.SearchError, match="fields"):
        space.check({"backbone": "cnn", "width": 8, "depth": 1, "embed_dim": 4})
    with pytest.raises(search.SearchError, match="'width'"):
        space.check({"backbone": "cnn", "width": 12, "embed_dim": 4})


def test_random_over_a_continuous_field_never_exhausts():
    strategy = search.make("random", {"depth": (1,), "learning_rate": LR})
    state, seen = strategy.init(), set()
    for t, key in enumerate(_keys(40)):
        choice, state = strategy.propose(state, key)
        state = strategy.observe(state, choice, 0.5, t)
        seen.add(search.canonical(choice))
    assert len(seen) == 40


def test_random_over_a_discrete_conditional_space_is_exact_then_exhausted():
    strategy = search.make("random", COND)
    state, seen = strategy.init(), set()
    for t, key in enumerate(_keys(10)):
        choice, state = strategy.propose(state, key)
        state = strategy.observe(state, choice, 0.5, t)
        seen.add(search.canonical(choice))
    assert len(seen) == 10
    with pytest.raises(search.Exhausted):
        strategy.propose(state, jax.random.key(99))


def test_evolution_mutates_one_field_of_a_continuous_space_within_range():
    space = {"backbone": ("mlp", "cnn"), "depth": {"low": 1, "high": 4}, "learning_rate": LR}
    strategy = search.make("evolution", space, population=3, tournament=2)
    state = strategy.init()
    for t, key in enumerate(_keys(20)):
        choice, state = strategy.propose(state, key)
        parent = state["last_parent"]
        assert strategy.domain.check(choice) == choice
        if parent is not None:
            before = state["history"][parent]["choice"]
            assert sum(before[f] != choice[f] for f in choice) == 1
        # Fitness: closeness of the learning rate to 1e-3 in log scale.
        state = strategy.observe(state, choice, -abs(math.log10(choice["learning_rate"]) + 3), t)
    assert t >= 3 and state["population"]
