"""Session setup shared by the test modules.

* JAX runs on the CPU, and every process of the session (this one and the CLI subprocesses,
  which inherit the environment) shares one fresh persistent compilation cache: the many
  short runs of the end-to-end tests compile each program once. A cached executable is the
  same program, so bitwise-reproducibility tests still compare like with like.
* One prepared digits data dir per session.
"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

_CACHE_DIR = tempfile.mkdtemp(prefix="jaxes-test-jax-cache-")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE_DIR)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

from jaxes import data  # noqa: E402  (after the environment above, which JAX reads at import)

ROOT = Path(__file__).resolve().parents[1]
SMOKE_CONFIG = f"--config={ROOT / 'configs' / 'digits.py'}:smoke"


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_CACHE_DIR, ignore_errors=True)


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory):
    """A TFDS data dir where digits is prepared once for the whole session."""
    data_dir = tmp_path_factory.mktemp("tfds_digits")
    data.load("digits", data_dir)
    return data_dir


@pytest.fixture(scope="session")
def digits(digits_data_dir):
    """The digits data set (read-only: its arrays are shared by every test)."""
    return data.load("digits", digits_data_dir)


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, digits_data_dir) -> Path:
    """One finished `configs/digits.py:smoke` run (read-only), made by the real CLI."""
    path = tmp_path_factory.mktemp("smoke_run")
    cmd = [sys.executable, "-m", "jaxes.main", SMOKE_CONFIG, f"--workdir={path}"]
    cmd.append(f"--config.data_dir={digits_data_dir}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, f"{proc.stdout}\n{proc.stderr}"
    return path
