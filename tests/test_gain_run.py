"""``--config.tolerance.rule=gain`` end to end through the real CLI: summary, plot, resume.

The run that is SIGKILLed is a real process; the others run in this process (``rounds.run``,
and the CLI's entry point for a bad flag), where a subprocess would add only JAX's start-up.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from jaxes import gain, workdir
from tests.test_cli import run_cli
from tests.test_generations import _smoke_config
from tests.test_rounds import _committed_rounds, _run_killed

ROOT = Path(__file__).resolve().parents[1]
SMOKE = f"--config={ROOT / 'configs' / 'digits.py'}:smoke"
GAIN = "--config.tolerance.rule=gain"
# gain's first estimate comes at round 5 (its tail needs 3 values in the last ceil(n / 2)
# rounds): a budget of 5, and max_rounds 6 to cap its extension.
BUDGET = {"rounds": 5, "tolerance.max_rounds": 6}


def _cmd(path, data_dir):
    return [sys.executable, "-m", "jaxes.main", SMOKE, GAIN, f"--workdir={path}",
            f"--config.data_dir={data_dir}",
            *(f"--config.{k}={v}" for k, v in BUDGET.items())]  # fmt: skip


def _run(path, data_dir) -> dict:
    """The gain smoke run in this process."""
    from jaxes import rounds

    config = _smoke_config(**{"tolerance.rule": "gain", "data_dir": str(data_dir), **BUDGET})
    with open(os.devnull, "w") as quiet:
        return rounds.run(config, path, stream=quiet)


def _without_wall(path):
    summary = {k: v for k, v in workdir.read_summary(path).items() if not k.endswith("_seconds")}
    rounds = [
        {k: v for k, v in r.items() if k != "wall_seconds"} for r in workdir.read_rounds(path)
    ]
    return summary, rounds


@pytest.fixture(scope="module")
def gain_run(tmp_path_factory, digits_data_dir):
    path = tmp_path_factory.mktemp("gain_run")
    _run(path, digits_data_dir)
    return path


def test_a_gain_run_writes_its_summary_plot_and_records(gain_run):
    summary = workdir.read_summary(gain_run)
    assert summary["rule"] == "gain"
    assert summary["patience"] is None and summary["r"] is None
    assert summary["stop_reason"] in ("gain", "budget", "max_rounds")
    assert (gain_run / "rounds.png").stat().st_size > 10_000
    records = workdir.read_rounds(gain_run)
    assert len(records) == summary["rounds_run"]
    # The records replay the rule: the same metrics through gain give the same estimates.
    state = gain.init(5, max_rounds=6)  # BUDGET; the defaults otherwise
    assert any(record["expected_gain"] is not None for record in records)
    for record in records:
        state = gain.update(state, record["metric"])
        assert (record["expected_gain"], record["noise_floor"]) == (state.gain, state.floor)
        assert (record["rounds_budget"], record["stopped"]) == (state.rounds, state.stopped)
    assert state.reason == summary["stop_reason"]
    assert state.best_round == summary["best_round"]
    resume = json.loads((gain_run / "checkpoints" / "resume_state.json").read_text())
    assert gain.State.from_dict(resume["tolerance"]) == state


def test_a_gain_run_resumes_after_sigkill_to_the_same_result(gain_run, tmp_path, digits_data_dir):
    ready = lambda path: _committed_rounds(path) >= 2  # noqa: E731
    _run_killed(tmp_path, digits_data_dir, ready, cmd=_cmd(tmp_path, digits_data_dir))
    assert not (tmp_path / "summary.json").exists()
    _run(tmp_path, digits_data_dir)
    assert _without_wall(tmp_path) == _without_wall(gain_run)


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("rule", "bogus", "config.tolerance.rule: must be one of ['gain', 'patent']"),
        ("gain.noise", -1.0, "config.tolerance.gain.noise: noise must be None or a finite"),
        ("gain.warmup", 0, "config.tolerance.gain.warmup: warmup must be an int >= 1"),
        ("max_rounds", 2, "config.tolerance.max_rounds: max_rounds must be an int >= rounds"),
    ],
)
def test_bad_gain_config_names_the_field(field, value, needle):
    import runpy

    from jaxes import runconfig

    config = runpy.run_path(str(ROOT / "configs" / "digits.py"))["get_config"]("smoke")
    config.tolerance.rule = "gain"
    section, _, name = f"tolerance.{field}".rpartition(".")
    target = config
    for part in section.split("."):
        target = target[part]
    target[name] = value
    with pytest.raises(runconfig.ConfigError) as info:
        runconfig.check_config(config)
    assert str(info.value).startswith(needle)


def test_an_unknown_rule_exits_2_with_one_sentence(capsys, tmp_path, digits_data_dir):
    argv = [*_cmd(tmp_path / "w", digits_data_dir)[3:], "--config.tolerance.rule=gains"]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert "config.tolerance.rule: must be one of ['gain', 'patent'], got 'gains'." in err
    assert not (tmp_path / "w").exists()
