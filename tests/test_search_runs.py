"""Searching a continuous learning rate in real runs: every strategy, and tpe resuming exactly
after SIGKILL (a killed real process, resumed in this one). tests/configs/search_smoke.py is the
digits smoke run with ``learning_rate`` a log range, so its compiled programs are the smoke run's.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from ml_collections.config_flags import config_flags

from jaxes import rounds, workdir
from tests.test_rounds import _committed_rounds, _run_killed

ROOT = Path(__file__).resolve().parents[1]
CONFIG = Path(__file__).resolve().parent / "configs" / "search_smoke.py"
LOW, HIGH = 3e-4, 3e-2


def _config(strategy: str, data_dir):
    config = config_flags.ConfigFileFlagParser("config").parse(f"{CONFIG}:{strategy}")
    with config.unlocked():
        config.data_dir = str(data_dir)
    return config


def _run_here(strategy, path, data_dir) -> dict:
    with open(os.devnull, "w") as quiet:
        return rounds.run(_config(strategy, data_dir), path, stream=quiet)


@pytest.fixture(scope="module")
def tpe_reference(tmp_path_factory, digits_data_dir):
    path = tmp_path_factory.mktemp("tpe_reference")
    _run_here("tpe", path, digits_data_dir)
    return path


def _check_searched(path):
    records = workdir.read_rounds(path)
    rates = [r["arch"]["learning_rate"] for r in records]
    assert len(records) >= 3 and len(set(rates)) == len(rates)
    assert all(LOW <= rate <= HIGH for rate in rates)
    # The round trained at the rate it was proposed (a traced argument, never config.train's).
    assert [r["learning_rate"] for r in records] == pytest.approx(rates, rel=1e-6)


def test_tpe_searches_the_learning_rate(tpe_reference):
    _check_searched(tpe_reference)
    assert workdir.read_summary(tpe_reference)["stop_reason"] == "patience"


@pytest.mark.parametrize("strategy", ["random", "evolution"])
def test_random_and_evolution_search_the_learning_rate(strategy, tmp_path, digits_data_dir):
    _run_here(strategy, tmp_path, digits_data_dir)
    _check_searched(tmp_path)


def test_tpe_resumes_exactly_after_sigkill(
    tpe_reference, tmp_path, digits_data_dir, assert_same_run
):
    cmd = [
        sys.executable, "-m", "jaxes.main", f"--config={CONFIG}:tpe", f"--workdir={tmp_path}",
        f"--config.data_dir={digits_data_dir}",
    ]  # fmt: skip
    _run_killed(tmp_path, digits_data_dir, lambda p: _committed_rounds(p) >= 2, cmd=cmd)
    assert not (tmp_path / "summary.json").exists()
    _run_here("tpe", tmp_path, digits_data_dir)
    assert_same_run(tpe_reference, tmp_path)
