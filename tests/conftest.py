"""Session setup shared by the test modules.

* JAX runs on the CPU, and every process of the session (this one, the pytest-xdist workers
  and the CLI subprocesses, which all inherit the environment) shares one fresh persistent
  compilation cache: the many short runs of the end-to-end tests compile each program once.
  A cached executable is the same program, so bitwise-reproducibility tests still compare like
  with like.
* XLA:CPU compiles for compile speed (``XLA_CPU_FLAG``: fusion emitters off and LLVM at -O2,
  unless ``XLA_FLAGS`` names either flag): the suite is mostly compiling, and its round
  programs compile about 2x faster that way (``benchmarks/compile_flags.py``). Their results
  differ from XLA's defaults in the last bits, so the tests compare runs with each other, never
  with a user's numbers; a test that needs XLA's defaults names them at compile time.
* One prepared digits data dir and one finished smoke run per session, shared by the xdist
  workers through a file lock (``shared``): the first worker to ask makes it.
* Round records of a small made-up run, for the plot, TensorBoard and progress tests.
"""

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

_CACHE_DIR = tempfile.mkdtemp(prefix="jaxes-test-jax-cache-")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE_DIR)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
XLA_CPU_FLAG = "--xla_cpu_use_fusion_emitters=false --xla_backend_optimization_level=2"
_NAMED = ("xla_cpu_use_fusion_emitters", "xla_backend_optimization_level")
if not any(name in os.environ.get("XLA_FLAGS", "") for name in _NAMED):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {XLA_CPU_FLAG}".strip()


# The CLI subprocesses fail on a deprecation that jaxes' own code triggers, as the test processes
# do (pyproject.toml). Only their own modules: a subprocess has none of pytest's ignores for
# third-party code. (-W matches a module name exactly, hence one entry per module.)
_OWN = sorted(f"jaxes.{p.stem}" for p in (Path(__file__).parents[1] / "jaxes").glob("*.py"))
os.environ.setdefault(
    "PYTHONWARNINGS", ",".join(f"error::DeprecationWarning:{m}" for m in ["__main__", *_OWN])
)


def device_flags(devices: int) -> str:
    """``XLA_FLAGS`` for a subprocess that sees ``devices`` CPU devices (and the suite's flag)."""
    return f"--xla_force_host_platform_device_count={devices} {XLA_CPU_FLAG}"


# After the environment above, which JAX reads at import.
from jaxes import data, instance, train, workdir  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SMOKE_CONFIG = f"--config={ROOT / 'configs' / 'digits.py'}:smoke"


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: one worker more than this process may use cores. A worker often waits, on a
    subprocess it started, on a live run it is about to kill, or on another worker making a
    shared fixture; the extra one fills that time (2 cores: 4 min 41 s with 3 workers, against
    5 min 26-39 s with 2 and 5 min 11 s with 4)."""
    return train.usable_cores() + 1


def pytest_sessionfinish(session, exitstatus):
    # The controller (or a run without xdist) made the cache; its workers share it.
    if not hasattr(session.config, "workerinput"):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def shared(tmp_path_factory, name: str, make) -> Path:
    """The directory ``name`` made once per session by ``make(path)``, whichever worker asks first.

    Under pytest-xdist every worker has its own base temp dir below one common parent; the lock
    there makes the others wait for the first and then reuse its result.
    """
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    path, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir()
            make(path)
            done.touch()
    return path


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory):
    """A TFDS data dir where digits is prepared once for the whole session."""
    return shared(tmp_path_factory, "tfds_digits", lambda path: data.load("digits", path))


@pytest.fixture(scope="session")
def digits(digits_data_dir):
    """The digits data set (read-only: its arrays are shared by every test)."""
    return data.load("digits", digits_data_dir)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, digits_data_dir) -> Path:
    """One finished `configs/digits.py:smoke` run (read-only), made by the real CLI."""

    def make(path):
        cmd = [sys.executable, "-m", "jaxes.main", SMOKE_CONFIG, f"--workdir={path}"]
        cmd.append(f"--config.data_dir={digits_data_dir}")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"

    return shared(tmp_path_factory, "smoke_run", make)


def _round_records(metrics, *, patience=3, budget=6):
    """Round records for a max-mode run, following docs/design.md §3 (ties reset, budget extension).

    A None metric is a failed round: it counts as below the best.
    """
    records, best, best_round, streak = [], None, None, 0
    for round_index, metric in enumerate(metrics):
        improved = metric is not None and (best is None or metric > best)
        if improved:
            best, best_round, streak = metric, round_index, 0
        elif metric is not None and metric >= best:
            streak = 0
        else:
            streak += 1
        count = round_index + 1
        stopped = streak >= patience
        if not stopped and patience > budget - count:
            budget = count + patience
        records.append(
            {
                "round_index": round_index,
                "status": "ok" if metric is not None else "failed",
                "message": None if metric is not None else f"loss became nan at epoch {count}",
                "arch": {"backbone": "mlp", "depth": 2, "width": 64 * count, "embed_dim": 32},
                "seed": 0,
                "dropout_rate": 0.1 + 0.01 * round_index,
                "log_rate": -2.0,
                "epochs": 10 + round_index,
                "best_epoch": 5,
                "metric": metric,
                "val_loss": 0.5 - 0.01 * round_index,
                "val_accuracy": metric,
                "train_loss": 0.3,
                "improved": improved,
                "best": best,
                "best_round": best_round,
                "streak": streak,
                "patience": patience,
                "rounds_budget": budget,
                "stopped": stopped,
                "reason": "patience" if stopped else None,
                "wall_seconds": 2.0 + round_index,
            }
        )
        if stopped:
            break
    return records


# A failed round (2), budget extensions (6 -> 7 -> 8 -> 9) and a stop by patience at round 6.
_RUN_METRICS = [0.90, 0.95, None, 0.96, 0.94, 0.93, 0.92]


@pytest.fixture
def make_records():
    """Builds round records from metrics (None: a failed round); see `_round_records`."""
    return _round_records


@pytest.fixture
def run_metrics():
    """The metrics of the standard run (a fresh list: tests may not share mutations)."""
    return list(_RUN_METRICS)


@pytest.fixture
def run_records(make_records, run_metrics):
    """The standard run's records: a failed round, budget extensions, a stop by patience."""
    records = make_records(run_metrics)
    assert records[-1]["stopped"] and records[-1]["rounds_budget"] > records[0]["rounds_budget"]
    return records


def _comparable(path) -> dict:
    """A run's summary without its timings (``wall_seconds``, ``knn_seconds``, ...)."""
    return {k: v for k, v in workdir.read_summary(path).items() if not k.endswith("_seconds")}


def _best_params(path):
    from flax import nnx

    model, meta = instance.load(path)
    return nnx.to_pure_dict(nnx.state(model)), meta


def _same_run(a, b) -> None:
    """Asserts two workdirs hold the same run: summary, best instance (bitwise) and rounds."""
    import jax

    assert _comparable(a) == _comparable(b)
    params_a, meta_a = _best_params(a)
    params_b, meta_b = _best_params(b)
    assert meta_a == meta_b
    leaves_a, tree_a = jax.tree.flatten(params_a)
    leaves_b, tree_b = jax.tree.flatten(params_b)
    assert tree_a == tree_b
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    def strip(path):
        return [
            {k: v for k, v in r.items() if k != "wall_seconds"} for r in workdir.read_rounds(path)
        ]

    assert strip(a) == strip(b)


@pytest.fixture
def assert_same_run():
    """``assert_same_run(a, b)``: two workdirs hold the same run, bit for bit."""
    return _same_run
