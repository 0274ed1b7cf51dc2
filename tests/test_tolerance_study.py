"""The tolerance study (experiments/): its rules, its cache, its tables, and replay == live.

The smoke study's cache (2 seeds x 2 strategies, 10 rounds each) is committed, so most tests
read it; the live tests train a few smoke rounds with jaxes' engine and compare them with it.
"""

import io
import itertools
import json
import math
import random
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))

import gain_variants  # noqa: E402
import study_cache  # noqa: E402
import study_rules  # noqa: E402
import study_stats  # noqa: E402
import tolerance_study  # noqa: E402

from jaxes import keys, rounds, stopping  # noqa: E402

SMOKE_CACHE = ROOT / "experiments" / "results" / "tolerance_cache_smoke.json"
BUDGETS, HORIZON = tolerance_study.SMOKE["budgets"], 2 * max(tolerance_study.SMOKE["budgets"])
# Rules that never run past the budget R (the patent's extension and gain's may, by design;
# fixed budgets above R run what they say).
BOUNDED = ("patience", "oracle", "optuna", "ax")


@pytest.fixture(scope="module")
def cache():
    return study_cache.load_cache(SMOKE_CACHE)


def test_the_committed_smoke_cache_matches_the_study_config(cache):
    seeds = tolerance_study.SMOKE["seeds"]
    assert sorted(cache) == sorted(f"{s}-{i}" for s in study_cache.STRATEGIES for i in seeds)
    for name, entry in cache.items():
        strategy, seed = name.rsplit("-", 1)
        config = study_cache.study_config(strategy, int(seed), HORIZON, smoke=True)
        assert entry["fingerprint"] == study_cache.fingerprint(config)
        assert len(entry["val"]) == HORIZON
        # Every round that set a new best has its test accuracy.
        best, records = -1.0, []
        for t, v in enumerate(entry["val"]):
            if v > best:
                best, records = v, [*records, str(t)]
        assert sorted(entry["test"], key=int) == records


@pytest.mark.parametrize("budget", BUDGETS)
def test_no_bounded_rule_beats_the_full_budget(cache, budget):
    for entry in cache.values():
        full = study_rules.kept_round(entry["val"], budget)
        for rule in study_stats.rule_set(budget, HORIZON):
            for used, weight in rule.outcomes(entry["val"], budget):
                assert weight > 0 and 1 <= used <= HORIZON
                if rule.family in BOUNDED or rule.name.endswith("no ext"):
                    assert used <= budget, rule.name  # the full budget uses the most rounds
                if used <= budget:  # within R no rule keeps a better validation score
                    kept = study_rules.kept_round(entry["val"], used)
                    assert entry["val"][kept] <= entry["val"][full], rule.name


def test_rerun_reuses_the_cache_and_prints_identical_tables(tmp_path, capsys):
    cache = tmp_path / "cache.json"
    shutil.copy(SMOKE_CACHE, cache)
    outputs = []
    for run_dir in ("a", "b"):
        out = tmp_path / run_dir
        args = ["--smoke", f"--out={out}", f"--cache={cache}", f"--work_root={tmp_path / 'w'}"]
        assert tolerance_study.main(args) == 0
        printed = capsys.readouterr().out
        assert "training" not in printed  # nothing was retrained
        files = {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.suffix != ".png"}
        outputs.append((printed, files))
        assert (out / "tolerance_study_smoke.png").stat().st_size > 10_000
    assert outputs[0] == outputs[1]
    assert cache.read_bytes() == SMOKE_CACHE.read_bytes()
    assert "| gain |" in outputs[0][0]


def test_patent_distribution_is_the_law_of_the_claim3_draw():
    for budget, ratio in ((20, 0.8), (40, 0.7), (5, 0.9), (3, 0.8)):
        law = dict(study_rules.patent_distribution(budget, ratio))
        assert sum(law.values()) == pytest.approx(1.0, abs=1e-12)
        rng = random.Random(0)
        n, counts = 40_000, {}
        for _ in range(n):  # r = ln(u), u uniform on (0, 1], as stopping.draw_r draws it
            p = stopping.patience_from(budget, ratio, math.log(1.0 - rng.random()))
            counts[p] = counts.get(p, 0) + 1
        assert set(counts) <= set(law)
        for p, w in law.items():
            assert counts.get(p, 0) / n == pytest.approx(w, abs=0.01)


def test_optuna_stagnation_by_hand():
    # min_n_trials 3, max_stagnation 2: the improvement 2 - (current - best) goes 1, 0, -1.
    val = [0.5, 0.7, 0.6, 0.6, 0.6, 0.9]
    assert study_rules.optuna_stagnation(val, 10, max_stagnation=2, min_n_trials=3) == 5
    # A failed round is not COMPLETE: it uses a round and is not counted.
    val = [0.5, 0.7, None, 0.6, 0.6, 0.6]
    assert study_rules.optuna_stagnation(val, 10, max_stagnation=2, min_n_trials=3) == 6
    assert study_rules.optuna_stagnation(val, 4, max_stagnation=2, min_n_trials=3) == 4


def test_ax_improvement_by_hand():
    # IQRs 1, 1.25, 1; best-over-window gains 2, 1, 0: only the last is below 0.5 * IQR.
    val = [1.0, 2.0, 3.0, 3.0, 3.0, 3.0]
    assert study_rules.ax_improvement(val, 10, window=3, bar=0.5, min_trials=3) == 5
    # An IQR of 0 never stops (NumPy divides to inf or NaN).
    assert study_rules.ax_improvement([1.0] * 8, 8, window=3, bar=0.5, min_trials=3) == 8


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-5, 5), min_size=1, max_size=30), st.sampled_from([25, 50, 75]))
def test_percentile_is_numpys(values, q):
    assert study_rules._percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_fixed_patience_counts_ties_as_no_improvement():
    assert study_rules.fixed_patience([0.5, 0.5, 0.5, 0.9], 10, 2) == 3
    assert study_rules.fixed_patience([0.5, 0.6, 0.7, 0.8], 4, 1) == 4


# ------------------------------------------------- replaying a rule equals running it live

LIVE_BUDGET = 3
# gain's tail is fitted to the last ceil(n / 2) rounds and needs 3 finite values there, so its
# first estimate comes at round 5: its live runs have budgets of 6 rounds, the smoke horizon.
# A floor the smoke rounds fall under at round 5 (random-0's last round is worth 0.04): a stop.
GAIN_STOPS = {"noise": 0.05}
# At its defaults gain extends at round 5, the budget, and max_rounds = 6 caps it there: 3 of
# those rounds are evolution's children, proposed from what the run observed, so the live run
# must follow the cached sequence.
GAIN_EXTENDS = {"max_rounds": 6}


@pytest.mark.parametrize(
    ("rule", "gain_kwargs", "strategy", "seed", "budget", "reason"),
    [
        ("gain", GAIN_STOPS, "random", 0, 6, "gain"),
        ("patent", {}, "random", 0, LIVE_BUDGET, None),
        ("gain", GAIN_EXTENDS, "evolution", 0, 5, "max_rounds"),
    ],
    ids=["gain", "patent", "gain-defaults-evolution"],
)
def test_replaying_on_the_cache_equals_a_live_run(
    cache, tmp_path, digits_data_dir, rule, gain_kwargs, strategy, seed, budget, reason
):
    config = study_cache.study_config(
        strategy, seed, HORIZON, smoke=True, data_dir=str(digits_data_dir)
    )
    config.rounds = budget
    config.tolerance.rule = rule
    config.tolerance.patience = None  # the patent's: drawn from the seed (claim 3)
    config.tolerance.extend = True
    config.tolerance.max_rounds = gain_kwargs.get("max_rounds")
    config.tolerance.gain.update({k: v for k, v in gain_kwargs.items() if k != "max_rounds"})
    summary = rounds.run(config, tmp_path / rule, stream=io.StringIO())
    entry = cache[f"{strategy}-{seed}"]
    if rule == "gain":
        used = study_rules.gain_rule(entry["val"], budget, **gain_kwargs)
        assert summary["stop_reason"] == reason
    else:
        r = keys.tolerance_r(keys.root(config.seed))
        patience = stopping.patience_from(budget, config.tolerance.ratio, r)
        assert summary["patience"] == patience
        used = study_rules.patent(entry["val"], budget, patience, 0.8, True)
    if strategy == "evolution":
        assert used > config.search.population  # the run reached evolution's children
    assert summary["rule"] == rule
    assert summary["rounds_run"] == used
    assert summary["best_round"] == study_rules.kept_round(entry["val"], used)
    assert summary["test_accuracy"] == entry["test"][str(summary["best_round"])]
    live = [json.loads(line)["metric"] for line in (tmp_path / rule / "rounds.jsonl").open()]
    assert live == entry["val"][:used]


# ------------------------------------------------- gain_variants: how gain's defaults were chosen


@pytest.fixture(scope="module")
def full_cache():
    return study_cache.load_cache(ROOT / "experiments" / "results" / "tolerance_cache.json")


def test_the_chosen_variant_is_jaxes_gain_at_its_defaults(full_cache):
    for strategy, seed, budget in itertools.product(study_cache.STRATEGIES, range(4), (20, 40)):
        val = full_cache[f"{strategy}-{seed}"]["val"]
        assert gain_variants.variant_rule(val, budget, *gain_variants.CHOSEN) == (
            study_rules.gain_rule(val, budget)
        ), (strategy, seed, budget)


def test_the_earlier_variant_is_the_earlier_gain(full_cache):
    # Mean rounds of jaxes.gain before experiments/gain_variants.py (commit a8ef3db), 20 seeds:
    # random R = 20, 40, then evolution R = 20, 40.
    means = []
    for strategy, budget in itertools.product(("random", "evolution"), (20, 40)):
        used = [gain_variants.variant_rule(full_cache[f"{strategy}-{s}"]["val"], budget,
                                           *gain_variants.EARLIER) for s in range(20)]  # fmt: skip
        means.append(round(sum(used) / len(used), 1))
    assert means == [8.7, 15.4, 8.4, 15.4]
