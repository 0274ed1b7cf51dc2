"""Session setup shared by the test modules.

* JAX runs on the CPU, and every process of the session (this one and the CLI subprocesses,
  which inherit the environment) shares one fresh persistent compilation cache: the many
  short runs of the end-to-end tests compile each program once. A cached executable is the
  same program, so bitwise-reproducibility tests still compare like with like.
* One prepared digits data dir per session.
"""

import os
import shutil
import tempfile

import pytest

_CACHE_DIR = tempfile.mkdtemp(prefix="jaxes-test-jax-cache-")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE_DIR)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

from jaxes import data  # noqa: E402  (after the environment above, which JAX reads at import)


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
