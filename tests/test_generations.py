"""Population rounds end to end (docs/design.md §6b): generations of K, in real processes where it
counts.

Proposals at K > 1 equal K = 1's for ``random``; a stop inside a generation discards the rest;
SIGKILL mid-generation resumes bitwise; K = 4 on 8 devices agrees with K = 4 on one; two gloo
processes at K = 2 agree with one.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess

import jax
import pytest

from jaxes import rounds, search, workdir
from tests.test_rounds import (
    ROOT,
    _cmd,
    _committed_rounds,
    _env,
    _run_killed,
    _run_two_processes,
)


def _smoke_config(**overrides):
    spec = importlib.util.spec_from_file_location("digits_config", ROOT / "configs" / "digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("smoke")
    for path, value in overrides.items():
        node = config
        *parents, leaf = path.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config


def _proposals(strategy, state, count, generation, fitness=lambda t: float(t % 3)):
    """``count`` proposals in generations of ``generation``, observing after each generation."""
    out = []
    for first in range(0, count, generation):
        batch = []
        for t in range(first, min(count, first + generation)):
            choice, state = strategy.propose(state, jax.random.fold_in(jax.random.key(9), t))
            batch.append((t, choice))
        for t, choice in batch:
            state = strategy.observe(state, choice, fitness(t), t)
        out.extend(choice for _, choice in batch)
    return out


SPACE = {"backbone": ["mlp", "cnn"], "depth": [1, 2, 3], "width": [16, 32, 64], "embed_dim": [8]}


def test_random_proposals_at_k8_equal_those_at_k1():
    strategy = search.make("random", SPACE)
    one = _proposals(strategy, strategy.init(), 16, 1)
    eight = _proposals(strategy, strategy.init(), 16, 8)
    assert one == eight
    assert len({search.canonical(c) for c in one}) == 16  # deduplicated


def test_evolution_at_k1_is_the_sequential_algorithm_and_k4_is_its_asynchronous_form():
    strategy = search.make("evolution", SPACE, population=4, tournament=2)
    one = _proposals(strategy, strategy.init(), 12, 1)
    # By hand: propose, observe, propose, observe ... is what K = 1 does.
    state, by_hand = strategy.init(), []
    for t in range(12):
        choice, state = strategy.propose(state, jax.random.fold_in(jax.random.key(9), t))
        state = strategy.observe(state, choice, float(t % 3), t)
        by_hand.append(choice)
    assert one == by_hand
    four = _proposals(strategy, strategy.init(), 12, 4)
    # The first generation fills the population with distinct random members, as K = 1 does.
    assert len({search.canonical(c) for c in four[:4]}) == 4
    assert four[:1] == one[:1] and four != one


def test_a_stop_inside_a_generation_discards_the_later_rounds(tmp_path, digits_data_dir):
    config = _smoke_config(**{"parallel.rounds": 4, "tolerance.r": None})
    config.tolerance.patience = 1  # the first round below the best stops the run
    config.data_dir = str(digits_data_dir)
    with open(os.devnull, "w") as devnull:
        summary = rounds.run(config, tmp_path, stream=devnull)
    records = workdir.read_rounds(tmp_path)
    assert summary["stop_reason"] == "patience"
    assert summary["rounds_run"] == len(records)
    # Generation 0 holds rounds 0-3 (seed 6: round 2 is the first below the best, so it stops
    # there); the rounds it did not use are discarded, not recorded.
    assert len(records) < 4
    assert summary["rounds_discarded"] == 4 - len(records)
    assert summary["best_round"] < summary["rounds_run"]
    assert all(r["generation"] == r["round_index"] // 4 for r in records)


def _run(path, digits_data_dir, population: int) -> dict:
    """The smoke run at population ``population``, in this process."""
    config = _smoke_config(**{"parallel.rounds": population})
    config.data_dir = str(digits_data_dir)
    with open(os.devnull, "w") as quiet:
        return rounds.run(config, path, stream=quiet)


@pytest.fixture(scope="module")
def k2_reference(tmp_path_factory, digits_data_dir):
    path = tmp_path_factory.mktemp("k2_reference")
    _run(path, digits_data_dir, 2)
    return path


def test_k2_proposes_what_k1_proposes_and_keeps_an_unpadded_best(k2_reference, smoke_run):
    one = workdir.read_rounds(smoke_run)
    two = workdir.read_rounds(k2_reference)
    common = min(len(one), len(two))
    assert [r["arch"] for r in one[:common]] == [r["arch"] for r in two[:common]]
    assert [r["generation"] for r in two] == [r["round_index"] // 2 for r in two]
    summary = workdir.read_summary(k2_reference)
    assert summary["population"] == 2
    assert summary["test_accuracy"] is not None


def test_sigkill_mid_generation_then_resume_equals_uninterrupted(
    k2_reference, tmp_path, digits_data_dir, assert_same_run
):
    def in_generation_one(path):
        return _committed_rounds(path) >= 2  # generation 0 committed: generation 1 is training

    proc_cmd = _cmd(tmp_path, digits_data_dir, "--config.parallel.rounds=2")
    _run_killed(tmp_path, digits_data_dir, in_generation_one, cmd=proc_cmd)
    assert not (tmp_path / "summary.json").exists()
    _run(tmp_path, digits_data_dir, 2)
    assert_same_run(k2_reference, tmp_path)


def _per_round(path):
    return [
        (r["arch"], r["val_accuracy"], r["val_loss"], r["epochs"])
        for r in workdir.read_rounds(path)
    ]


def test_k4_on_eight_devices_agrees_with_k4_on_one(tmp_path, digits_data_dir):
    assert jax.device_count() == 1  # this process: the one-device side
    _run(tmp_path / "devices1", digits_data_dir, 4)
    path = tmp_path / "devices8"
    cmd = _cmd(path, digits_data_dir, "--config.parallel.rounds=4")
    proc = subprocess.run(cmd, env=_env(8), capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = {1: _per_round(tmp_path / "devices1"), 8: _per_round(path)}
    # Mesh (4, 2) on 8 devices: each instance's batch is split over 2 devices, so gradients are
    # summed in another order; float32 differences of ~1e-6 stay far below one validation
    # example (1/359 of accuracy), so accuracies and epochs agree exactly, losses to 1e-4.
    assert len(runs[1]) == len(runs[8])
    for (arch1, acc1, loss1, ep1), (arch8, acc8, loss8, ep8) in zip(runs[1], runs[8], strict=True):
        assert arch1 == arch8 and acc1 == acc8 and ep1 == ep8
        assert loss1 == pytest.approx(loss8, rel=1e-4)


def test_two_gloo_processes_at_k2_match_one_process(k2_reference, tmp_path, digits_data_dir):
    _run_two_processes(tmp_path, digits_data_dir, "--config.parallel.rounds=2")
    # Two processes, one device each: the mesh is (2, 1), one instance per process.
    one, two = _per_round(k2_reference), _per_round(tmp_path)
    assert len(one) == len(two)
    for (arch1, acc1, loss1, ep1), (arch2, acc2, loss2, ep2) in zip(one, two, strict=True):
        assert arch1 == arch2 and acc1 == acc2 and ep1 == ep2
        assert loss1 == pytest.approx(loss2, rel=1e-4)
    best = [workdir.read_summary(p)["best_round"] for p in (tmp_path, k2_reference)]
    assert best[0] == best[1]
