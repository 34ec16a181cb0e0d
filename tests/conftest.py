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
