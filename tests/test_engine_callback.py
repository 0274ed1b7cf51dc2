"""The round program carries a host callback only when someone listens to epochs.

A ``jax.debug.callback`` keys JAX's persistent compilation cache by process, so a program that
carries one recompiles in every new process (every worker of experiments/tolerance_study.py, every
rerun): 7-11 s per size bucket on 2 CPU cores. The program builder is stubbed here, so nothing
compiles.
"""

import importlib.util
import pathlib

import jax
import pytest

from jaxes import models, population, train

CONFIG_FILE = pathlib.Path(__file__).parent.parent / "configs" / "digits.py"


class _Built(Exception):
    """Raised by the stub once the engine has built its program."""


def _train_config():
    spec = importlib.util.spec_from_file_location("digits_config", CONFIG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config("smoke").train


@pytest.mark.parametrize("listening", [False, True])
def test_report_callback_only_with_on_epoch(digits, monkeypatch, listening):
    seen = []

    def stub(graphdef, st, mesh, report=None):
        seen.append(report)
        raise _Built

    monkeypatch.setattr(population, "program", stub)
    on_epoch = (lambda job, epoch, loss: None) if listening else None
    engine = train.Engine(digits, _train_config(), on_epoch=on_epoch)
    arch = models.Arch(backbone="mlp", depth=1, width=16, embed_dim=8)
    with pytest.raises(_Built):
        engine.train([train.Job(arch, jax.random.key(0), 1e-3, 1e-4)])
    assert len(seen) == 1
    assert (seen[0] is not None) == listening
