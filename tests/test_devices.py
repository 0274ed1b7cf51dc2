"""The whole rounds job on 8 fake CPU devices, in one process: the batch sharded over a mesh of 8,
every round trained, checkpointed, restored and evaluated, with the 1-device run's results."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from jaxes import workdir
from tests.conftest import device_flags

ROOT = Path(__file__).resolve().parents[1]

_RUN_ON_8 = textwrap.dedent(
    """
    import sys
    import jax
    from ml_collections.config_flags import config_flags
    from jaxes import rounds, sharding

    assert jax.device_count() == 8, jax.devices()
    assert sharding.make_mesh().size == 8
    config = config_flags.ConfigFileFlagParser("config").parse(sys.argv[1] + ":smoke")
    with config.unlocked():
        config.data_dir = sys.argv[3]
    rounds.run(config, sys.argv[2])
    """
)


def test_the_smoke_run_on_8_devices_matches_one_device(smoke_run, tmp_path, digits_data_dir):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = device_flags(8)
    config = ROOT / "configs" / "digits.py"
    proc = subprocess.run(
        [sys.executable, "-c", _RUN_ON_8, str(config), str(tmp_path), str(digits_data_dir)],
        env=env, capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, eight = workdir.read_summary(smoke_run), workdir.read_summary(tmp_path)
    # Architectures and dropout rates come from the keys alone; the metrics may differ only by
    # the order of the 8-way gradient reduction.
    rounds_one, rounds_eight = workdir.read_rounds(smoke_run), workdir.read_rounds(tmp_path)
    assert [r["arch"] for r in rounds_eight] == [r["arch"] for r in rounds_one]
    assert [r["log_rate"] for r in rounds_eight] == [r["log_rate"] for r in rounds_one]
    for key in ("best_round", "rounds_run", "rounds_budget", "stop_reason", "best_arch"):
        assert eight[key] == one[key], key
    assert abs(eight["best_metric"] - one["best_metric"]) <= 1e-3
    assert abs(eight["test_metric"] - one["test_metric"]) <= 0.01
