"""Test-wide settings."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402  (after the log level is set)
import pytest  # noqa: E402


@pytest.fixture
def global_dtype_policy():
    """For a test that sets the global dtype policy: restores float32 afterwards."""
    yield keras.config.set_dtype_policy
    keras.config.set_dtype_policy("float32")


# Modules whose tests run the training binaries or other subprocesses end to end: every
# test in them is `slow`. Slow tests elsewhere carry `@pytest.mark.slow` themselves.
END_TO_END_MODULES = {"test_distribution", "test_faults", "test_lm", "test_lm_table",
                      "test_nmt", "test_saved_model"}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.module.__name__.rpartition(".")[2] in END_TO_END_MODULES:
            item.add_marker(pytest.mark.slow)
