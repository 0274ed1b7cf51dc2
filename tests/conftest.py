"""Session fixtures shared by the test modules: one prepared digits data dir per test session."""

import pytest

from jaxes import data


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
