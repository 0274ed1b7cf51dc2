"""The tolerance study's numbers: every rule on every cached sequence, with paired intervals.

For a strategy and a budget ``R``, each seed's reference is the full budget: the best-validation
instance of its first ``R`` rounds. A rule's outcome on a seed is its rounds used, the kept
instance's validation and test accuracy, its test regret (the reference's test accuracy minus
the kept one's: positive is worse), and whether it stopped before the reference's round. The
patent rule is averaged exactly over its tolerance law (``study_rules.patent_distribution``).
Intervals are paired bootstrap 95% intervals over seeds (fixed generator seed, so a rerun
prints the same tables).
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import gain_variants
import numpy as np
import study_rules as rules

BOOTSTRAP = 4000
PATIENCES = (1, 2, 3, 5, 8, 10, 15, 20)
FIXED_BUDGETS = (5, 10, 15, 20, 30)
RATIOS = (0.7, 0.8, 0.9)
PATENT_DEFAULT = "patent 0.8 ext"  # configs/digits.py: ratio 0.8, budget extension on
EARLIER_GAIN = "gain, all rounds, exp tail"  # gain's default before experiments/gain_variants.py


@dataclasses.dataclass(frozen=True)
class Rule:
    """A rule: its name, family (for plots and frontiers) and per-sequence outcome law."""

    name: str
    family: str
    outcomes: object  # (val, budget) -> [(rounds used, probability)]


def rule_set(budget: int, horizon: int) -> list[Rule]:
    """Every rule of the study at budget ``R`` (fixed budgets up to the cached horizon)."""
    one = lambda fn: lambda val, r: [(fn(val, r), 1.0)]  # noqa: E731
    out = [Rule("full budget", "full", one(lambda v, r: r))]
    for n in FIXED_BUDGETS:
        if n <= horizon:
            out.append(Rule(f"fixed budget {n}", "budget", one(lambda v, r, n=n: n)))
    out.append(Rule("best in hindsight", "oracle",
                    one(lambda v, r: rules.kept_round(v, r) + 1)))  # fmt: skip
    for p in PATIENCES:
        if p <= budget:
            out.append(Rule(f"patience {p}", "patience",
                            one(lambda v, r, p=p: rules.fixed_patience(v, r, p))))  # fmt: skip
    for ratio in RATIOS:
        for extend in (True, False):

            def law(v, r, ratio=ratio, extend=extend):
                return [(rules.patent(v, r, j, ratio, extend), w)
                        for j, w in rules.patent_distribution(r, ratio)]  # fmt: skip

            tag = "ext" if extend else "no ext"
            out.append(Rule(f"patent {ratio} {tag}", "patent", law))
    for stag in (30, 5):
        out.append(Rule(f"optuna stagnation {stag}", "optuna",
                        one(lambda v, r, s=stag: rules.optuna_stagnation(v, r, s))))  # fmt: skip
    for bar in (0.1, 0.01):
        out.append(Rule(f"ax window 5 bar {bar}", "ax",
                        one(lambda v, r, b=bar: rules.ax_improvement(v, r, 5, b))))  # fmt: skip
    out.append(Rule("gain", "gain", one(rules.gain_rule)))
    # The rule's earlier default (an exponential tail fitted to every round, experiments/
    # gain_variants.py), kept in the tables for the record.
    earlier = lambda v, r: gain_variants.variant_rule(v, r, *gain_variants.EARLIER)  # noqa: E731
    out.append(Rule(EARLIER_GAIN, "gain, earlier default", one(earlier)))
    return out


def seed_outcomes(rule: Rule, seq: dict, budget: int) -> dict:
    """The expected outcome of ``rule`` on one cached sequence (means over its law)."""
    val, test = seq["val"], seq["test"]
    ref = rules.kept_round(val, budget)
    ref_test = test[str(ref)]
    acc = dict.fromkeys(("used", "used2", "val", "test", "regret", "early"), 0.0)
    for used, w in rule.outcomes(val, budget):
        kept = rules.kept_round(val, used)
        kept_test = test[str(kept)]
        acc["used"] += w * used
        acc["used2"] += w * used * used
        acc["val"] += w * val[kept]
        acc["test"] += w * kept_test
        acc["regret"] += w * (ref_test - kept_test)
        acc["early"] += w * (used <= ref)
    return acc


def _bootstrap_mean(values: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    idx = rng.integers(0, len(values), (BOOTSTRAP, len(values)))
    means = values[idx].mean(axis=1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def _frontier(points: list[tuple[float, np.ndarray]], rounds: float) -> np.ndarray:
    """Per-seed regrets of a frontier, linearly interpolated at mean rounds ``rounds``.

    ``points`` are (mean rounds, per-seed regrets), sorted by rounds; outside their range the
    nearest end point is used.
    """
    if rounds <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 <= rounds <= x1:
            w = 0.0 if x1 == x0 else (rounds - x0) / (x1 - x0)
            return (1 - w) * y0 + w * y1
    return points[-1][1]


def cell(sequences: list[dict], budget: int, horizon: int) -> list[dict]:
    """Every rule's row for one strategy and budget (``sequences``: one per seed)."""
    rng = np.random.default_rng(0)
    per_rule = {}
    for rule in rule_set(budget, horizon):
        outs = [seed_outcomes(rule, seq, budget) for seq in sequences]
        per_rule[rule.name] = (rule, {k: np.array([o[k] for o in outs]) for k in outs[0]})

    def points(family):
        pts = [(v["used"].mean(), v["regret"]) for r, v in per_rule.values() if r.family == family]
        full = per_rule["full budget"][1]
        return sorted([*pts, (full["used"].mean(), full["regret"])], key=lambda p: p[0])

    patience_front, budget_front = points("patience"), points("budget")
    patent_default = per_rule[PATENT_DEFAULT][1]
    rows = []
    for name, (rule, v) in per_rule.items():
        mean_used = float(v["used"].mean())
        sd_used = math.sqrt(max(0.0, float(v["used2"].mean()) - mean_used**2))
        row = {
            "rule": name, "family": rule.family, "budget": budget, "seeds": len(sequences),
            "rounds_mean": mean_used, "rounds_sd": sd_used, "saved": 1 - mean_used / budget,
            "val_mean": float(v["val"].mean()), "test_mean": float(v["test"].mean()),
            "regret": float(v["regret"].mean()),
        }  # fmt: skip
        row["regret_lo"], row["regret_hi"] = _bootstrap_mean(v["regret"], rng)
        row["early_rate"] = float(v["early"].mean())
        for tag, front in (("patience", patience_front), ("budget", budget_front)):
            diff = v["regret"] - _frontier(front, mean_used)
            row[f"vs_{tag}"] = float(diff.mean())
            row[f"vs_{tag}_lo"], row[f"vs_{tag}_hi"] = _bootstrap_mean(diff, rng)
        # Paired against the patent's rule at its defaults: rounds and regret differences.
        row["rounds_vs_patent"] = mean_used - float(patent_default["used"].mean())
        diff = v["regret"] - patent_default["regret"]
        row["vs_patent"] = float(diff.mean())
        row["vs_patent_lo"], row["vs_patent_hi"] = _bootstrap_mean(diff, rng)
        rows.append(row)
    return rows


def table(sequences_by_strategy: dict, budgets, horizon: int) -> list[dict]:
    """All rows: for each strategy and budget, every rule."""
    rows = []
    for strategy, sequences in sequences_by_strategy.items():
        for budget in budgets:
            for row in cell(sequences, budget, horizon):
                rows.append({"strategy": strategy, **row})
    return rows
