"""experiments/strategy_study.py: the per-round-count reading of cached sequences (no training)."""

from __future__ import annotations

import math
import runpy
from pathlib import Path

STUDY = runpy.run_path(
    str(Path(__file__).resolve().parents[1] / "experiments" / "strategy_study.py")
)


def _rows(vals, tests):
    return [
        {"round_index": t, "val": v, "test": x}
        for t, (v, x) in enumerate(zip(vals, tests, strict=True))
    ]


def test_best_so_far_keeps_the_earliest_best_and_skips_failed_rounds():
    rows = _rows([None, 0.5, 0.7, 0.7, 0.6], [None, 0.4, 0.8, 0.9, 0.95])
    best_so_far = STUDY["best_so_far"]
    assert math.isnan(best_so_far(rows, 1)[0])
    assert best_so_far(rows, 2) == (0.5, 0.4)
    assert best_so_far(rows, 5) == (0.7, 0.8)  # round 3 ties round 2: the earlier one is kept


def test_table_counts_tpe_wins_ties_and_losses_per_seed():
    runs = {
        "tpe": {0: _rows([0.9, 0.95], [0.9, 0.9]), 1: _rows([0.8, 0.8], [0.7, 0.7]),
                2: _rows([0.7, 0.7], [0.6, 0.6])},
        "random": {0: _rows([0.9, 0.9], [0.9, 0.9]), 1: _rows([0.8, 0.8], [0.7, 0.7]),
                   2: _rows([0.9, 0.9], [0.9, 0.9])},
    }  # fmt: skip
    lines = STUDY["table"](runs, [1, 2]).splitlines()
    at_two = next(line for line in lines if line.startswith("| 2 | random"))
    assert at_two.endswith("| 1/1/1 |")  # seed 0 won, seed 1 tied, seed 2 lost
    at_one = next(line for line in lines if line.startswith("| 1 | random"))
    assert at_one.endswith("| 0/2/1 |")
    tpe_two = next(line for line in lines if line.startswith("| 2 | tpe"))
    assert "0.8167" in tpe_two  # mean of 0.95, 0.8, 0.7
