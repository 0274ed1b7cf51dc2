"""Tests for jaxes.search: dedup, aging evolution, determinism, JSON state, validation."""

import collections
import itertools
import json
import math

import jax
import pytest

from jaxes import search

SPACE = {
    "backbone": ["mlp", "cnn"],
    "depth": [1, 2, 3],
    "width": [64, 128, 256],
    "embed_dim": [32, 64],
}
SPACE_SIZE = 2 * 3 * 3 * 2


def space_fitness(choice):
    """A deterministic fitness with ties: bigger models score higher, whatever the backbone."""
    return float(choice["depth"] * choice["width"] + choice["embed_dim"])


def run(strategy, rounds, seed=0, fitness_fn=space_fitness, roundtrip=False, round_stride=1):
    """Runs propose/observe for `rounds` rounds; returns [(choice, state after propose)]."""
    key = jax.random.key(seed)
    state = strategy.init()
    steps = []
    for step in range(rounds):
        round_index = step * round_stride
        if roundtrip:
            state = json.loads(json.dumps(state))
        choice, state = strategy.propose(state, jax.random.fold_in(key, round_index))
        steps.append((choice, state))
        if roundtrip:
            state = json.loads(json.dumps(state))
        state = strategy.observe(state, choice, fitness_fn(choice), round_index)
    return steps, state


def test_canonical_is_order_independent_and_compact():
    assert search.canonical({"b": 1, "a": "x"}) == search.canonical({"a": "x", "b": 1})
    assert search.canonical({"b": 2, "a": 1}) == '{"a":1,"b":2}'
    assert search.canonical({"a": 1}) != search.canonical({"a": 1.0})


def test_fixed_always_proposes_its_arch_and_defaults_to_first_values():
    arch = {"backbone": "cnn", "depth": 3, "width": 128, "embed_dim": 64}
    steps, _ = run(search.make("fixed", SPACE, arch=arch), 5)
    assert [choice for choice, _ in steps] == [arch] * 5
    steps, _ = run(search.make("fixed", SPACE), 2)
    assert steps[0][0] == {field: values[0] for field, values in SPACE.items()}


def test_random_never_repeats_and_is_exhausted_when_the_space_is_used_up():
    # Enough draws that finding the last of 36 architectures is certain: (35/36)^1000 ~ 1e-12.
    strategy = search.make("random", SPACE, max_collisions=1000)
    steps, state = run(strategy, SPACE_SIZE)
    keys = [search.canonical(choice) for choice, _ in steps]
    assert len(set(keys)) == SPACE_SIZE
    all_choices = {
        search.canonical(dict(zip(SPACE, values, strict=True)))
        for values in itertools.product(*SPACE.values())
    }
    assert set(keys) == all_choices
    with pytest.raises(search.Exhausted):
        strategy.propose(state, jax.random.key(99))


def test_random_counts_consecutive_collisions():
    # Six architectures left and a single draw allowed: some keys find one, the others give up.
    steps, state = run(search.make("random", SPACE), SPACE_SIZE - 6)
    seen = {search.canonical(choice) for choice, _ in steps}
    strategy = search.make("random", SPACE, max_collisions=1)
    outcomes = collections.Counter()
    for seed in range(60):
        try:
            choice, _ = strategy.propose(state, jax.random.key(seed))
        except search.Exhausted:
            outcomes["exhausted"] += 1
        else:
            assert search.canonical(choice) not in seen
            outcomes["found"] += 1
    assert outcomes["exhausted"] > 0 and outcomes["found"] > 0


def test_random_first_proposal_covers_every_value_roughly_uniformly():
    strategy = search.make("random", SPACE)
    counts = collections.defaultdict(collections.Counter)
    draws = 300
    for seed in range(draws):
        choice, _ = strategy.propose(strategy.init(), jax.random.key(seed))
        for field, value in choice.items():
            counts[field][value] += 1
    for field, values in SPACE.items():
        expected = draws / len(values)
        for value in values:
            assert abs(counts[field][value] - expected) < 0.3 * expected, (field, value)


def test_evolution_initial_population_is_random_and_distinct():
    strategy = search.make("evolution", SPACE, population=8, tournament=3)
    steps, _ = run(strategy, 8)
    assert len({search.canonical(choice) for choice, _ in steps}) == 8
    assert all(state["last_parent"] is None for _, state in steps)


def test_evolution_population_larger_than_space_allows_repeats():
    tiny = {"depth": [1, 2]}
    strategy = search.make("evolution", tiny, population=5, tournament=2)
    _, state = run(strategy, 7, fitness_fn=lambda choice: float(choice["depth"]))
    assert len(state["population"]) == 5
    assert sorted({record["choice"]["depth"] for record in strategy.members(state)}) == [1, 2]


def test_evolution_ages_out_the_oldest_even_when_it_is_the_best():
    population, extra = 4, 9
    strategy = search.make("evolution", SPACE, population=population, tournament=2)

    counter = itertools.count()

    def decreasing(choice):
        return 100.0 - next(counter)  # The first member is the best ever.

    _, state = run(strategy, population + extra, fitness_fn=decreasing, round_stride=10)
    members = strategy.members(state)
    expected_rounds = [10 * step for step in range(extra, population + extra)]
    assert [record["round_index"] for record in members] == expected_rounds
    assert members == state["history"][-population:]
    # The incumbent is round 0, which left the population long ago.
    incumbent = strategy.incumbent(state)
    assert incumbent["round_index"] == 0 and incumbent["fitness"] == 100.0


def test_evolution_tournament_parent_and_single_mutation():
    population, tournament = 6, 3
    space = {**SPACE, "dropout_kind": ["standard"]}  # A one-value field can never mutate.
    strategy = search.make("evolution", space, population=population, tournament=tournament)
    steps, state = run(strategy, 80)
    mutated_fields = collections.Counter()
    history = state["history"]
    for step, (child, after_propose) in enumerate(steps[population:], start=population):
        members = after_propose["population"]
        sampled = after_propose["last_tournament"]
        assert len(sampled) == tournament and len(set(sampled)) == tournament
        assert set(sampled) <= set(members) and len(members) == population
        parent_index = after_propose["last_parent"]
        assert parent_index in sampled
        best = max(history[index]["fitness"] for index in sampled)
        assert history[parent_index]["fitness"] == best
        # Ties go to the oldest (lowest history index) among the best.
        assert parent_index == min(i for i in sampled if history[i]["fitness"] == best)
        parent = history[parent_index]["choice"]
        changed = [field for field in space if child[field] != parent[field]]
        assert len(changed) == 1, (parent, child)
        assert child[changed[0]] in space[changed[0]]
        assert history[step]["parent"] == parent_index
        mutated_fields[changed[0]] += 1
    assert set(mutated_fields) == set(SPACE)  # Every multi-value field gets mutated sometimes.


def test_evolution_failed_rounds_never_become_parents_over_a_finite_member():
    strategy = search.make("evolution", SPACE, population=5, tournament=3)

    def often_failing(choice):
        return None if choice["width"] != 128 else space_fitness(choice)

    steps, state = run(strategy, 60, fitness_fn=often_failing)
    history = state["history"]
    checked = 0
    for _, after_propose in steps[5:]:
        sampled = after_propose["last_tournament"]
        if any(history[index]["fitness"] is not None for index in sampled):
            assert history[after_propose["last_parent"]]["fitness"] is not None
            checked += 1
        else:  # All failed: the oldest member is the parent.
            assert after_propose["last_parent"] == min(sampled)
    assert checked > 0


def test_incumbent_is_none_when_every_round_failed_and_nan_counts_as_failed():
    strategy = search.make("evolution", SPACE, population=2, tournament=1)
    _, state = run(strategy, 4, fitness_fn=lambda choice: math.nan)
    assert strategy.incumbent(state) is None
    assert all(record["fitness"] is None for record in state["history"])
    json.dumps(state, allow_nan=False)


@pytest.mark.parametrize("name", ["random", "evolution"])
def test_same_key_same_proposals_and_other_key_differs(name):
    strategy = search.make(name, SPACE)
    first = [choice for choice, _ in run(strategy, 20, seed=0)[0]]
    again = [choice for choice, _ in run(strategy, 20, seed=0)[0]]
    other = [choice for choice, _ in run(strategy, 20, seed=1)[0]]
    assert first == again
    assert first != other


@pytest.mark.parametrize("name", ["fixed", "random", "evolution"])
def test_json_round_trip_at_every_step_gives_identical_proposals(name):
    strategy = search.make(name, SPACE)
    direct_steps, direct_state = run(strategy, 20)
    trip_steps, trip_state = run(strategy, 20, roundtrip=True)
    assert [c for c, _ in direct_steps] == [c for c, _ in trip_steps]
    assert json.loads(json.dumps(direct_state)) == trip_state


def test_propose_is_pure_so_a_kill_before_observe_replays_the_same_choice():
    strategy = search.make("evolution", SPACE, population=3, tournament=2)
    _, state = run(strategy, 7)
    saved = json.dumps(state)
    key = jax.random.key(123)
    choice, _ = strategy.propose(state, key)
    assert json.dumps(state) == saved  # The input state is untouched.
    resumed = json.loads(saved)
    assert strategy.propose(resumed, key)[0] == choice


@pytest.mark.parametrize(
    "name, params, generation, seen_rounds",
    [
        ("fixed", {}, 1, 12),
        ("random", {}, 1, 12),
        ("random", {}, 3, 12),
        # Evolution sees ahead while members and pending proposals fill less than its
        # population of 5: at generations of 1, rounds 1-4 from rounds 0-3; at generations of
        # 3, rounds 3-4 from rounds 0-2, and then nothing (3 members and 3 pending).
        ("evolution", {"population": 5}, 1, 4),
        ("evolution", {"population": 5}, 3, 2),
    ],
)
def test_a_strategy_that_sees_ahead_proposes_what_it_will_whatever_the_outcomes(
    name, params, generation, seen_rounds
):
    # Proposals made from the state with a generation still pending (what a run compiles ahead)
    # equal the ones made after that generation is observed, under several outcomes.
    strategy = search.make(name, SPACE, **params)
    key = jax.random.key(3)
    fitnesses = [lambda c, t: None, lambda c, t: float(t % 4), lambda c, t: -space_fitness(c)]
    for fitness in fitnesses:
        state, rounds_seen, t = strategy.init(), 0, 0
        while t < 12:
            pending = []
            for _ in range(generation):
                choice, state = strategy.propose(state, jax.random.fold_in(key, t + len(pending)))
                pending.append(choice)
            ahead, look = [], state
            for u in range(t + generation, t + 2 * generation):
                if not strategy.sees_ahead(look):
                    break
                choice, look = strategy.propose(look, jax.random.fold_in(key, u))
                ahead.append(choice)
            for i, choice in enumerate(pending):
                state = strategy.observe(state, choice, fitness(choice, t + i), t + i)
            t += generation
            after, real = [], state
            for u in range(t, t + len(ahead)):
                choice, real = strategy.propose(real, jax.random.fold_in(key, u))
                after.append(choice)
            assert ahead == after
            rounds_seen += len(ahead)
        assert rounds_seen == seen_rounds


def test_space_field_order_does_not_change_proposals():
    reordered = dict(reversed(list(SPACE.items())))
    first = run(search.make("evolution", SPACE), 15)[0]
    second = run(search.make("evolution", reordered), 15)[0]
    assert [c for c, _ in first] == [c for c, _ in second]


def test_observe_rejects_repeated_round_and_foreign_state():
    strategy = search.make("random", SPACE)
    _, state = run(strategy, 2, round_stride=5)
    choice, proposed = strategy.propose(state, jax.random.key(1))
    with pytest.raises(search.SearchError, match="round_index"):
        strategy.observe(proposed, choice, 1.0, 5)
    with pytest.raises(search.SearchError, match="'evolution'"):
        search.make("fixed", SPACE).propose(search.make("evolution", SPACE).init(), None)
    with pytest.raises(search.SearchError, match="'depth'"):
        strategy.observe(proposed, {**choice, "depth": 7}, 1.0, 20)


@pytest.mark.parametrize(
    ("name", "space", "params", "named"),
    [
        ("random", {}, {}, "empty"),
        ("random", {"depth": []}, {}, "'depth'"),
        ("random", {"depth": [1, 2, 1]}, {}, "'depth'"),
        ("random", {"depth": "123"}, {}, "'depth'"),
        ("random", {"width": [64, [128]]}, {}, "'width'"),
        ("random", {"width": [64, math.inf]}, {}, "'width'"),
        ("random", {"width": [64]}, {"max_collisions": 0}, "'max_collisions'"),
        ("fixed", SPACE, {"arch": {"backbone": "cnn"}}, "fields"),
        (
            "fixed",
            SPACE,
            {"arch": {"backbone": "rnn", "depth": 1, "width": 64, "embed_dim": 32}},
            "'backbone'",
        ),
        ("evolution", SPACE, {"population": 0}, "'population'"),
        ("evolution", SPACE, {"population": 3, "tournament": 4}, "'tournament'"),
        ("evolution", SPACE, {"tournament": 0}, "'tournament'"),
        ("evolution", SPACE, {"population": True}, "'population'"),
        ("evolution", SPACE, {"populaton": 4}, "'populaton'"),
        ("evolution", {"depth": [1]}, {}, "two values"),
        ("greedy", SPACE, {}, "'evolution'"),
    ],
)
def test_validation_errors_name_the_problem(name, space, params, named):
    with pytest.raises(search.SearchError, match=named):
        search.make(name, space, **params)


def test_unknown_strategy_lists_valid_names():
    with pytest.raises(search.SearchError) as error:
        search.make("greedy", SPACE)
    for valid in ("fixed", "random", "evolution"):
        assert valid in str(error.value)
