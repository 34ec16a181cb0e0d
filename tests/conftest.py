"""Test-wide settings."""

import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402  (after the log level is set)
import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def temporary_files_under_basetemp(tmp_path_factory):
    """The suite's processes write their temporary files under pytest's base temporary
    directory, which pytest prunes (it keeps the last three runs'): the processes that
    end by os._exit (DTensor's, the binary runner) cannot remove AutoGraph's generated
    modules, and TFDS's mock data leaves directories."""
    previous = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(tmp_path_factory.mktemp("tmp", numbered=False))
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again
    yield
    if previous is None:
        del os.environ["TMPDIR"]
    else:
        os.environ["TMPDIR"] = previous
    tempfile.tempdir = None


@pytest.fixture
def global_dtype_policy():
    """For a test that sets the global dtype policy: restores float32 afterwards."""
    yield keras.config.set_dtype_policy
    keras.config.set_dtype_policy("float32")


# Modules whose tests run the training binaries or other subprocesses end to end: every
# test in them is `slow`. Slow tests elsewhere carry `@pytest.mark.slow` themselves. Listed
# longest first (their minutes in session 22's `make test`: 6.6, 5.8, 3.1, 1.9, 1.3, 1.2).
END_TO_END_MODULES = ("test_lm", "test_distribution", "test_nmt", "test_faults",
                      "test_saved_model", "test_lm_table")


def module_name(item) -> str:
    return item.module.__name__.rpartition(".")[2]


def is_end_to_end(item):
    return module_name(item) in END_TO_END_MODULES


def pytest_collection_modifyitems(items):
    for item in items:
        if is_end_to_end(item):
            item.add_marker(pytest.mark.slow)
    # `make test` hands each module to one of its workers in the order of its first test
    # (xdist's `loadscope` mode without its reordering by test count, which put the few
    # long tests of test_faults last). Longest first: the end-to-end modules in their
    # order, then the modules with slow tests, so that no long module runs alone at the end.
    with_slow_tests = {module_name(item) for item in items if item.get_closest_marker("slow")}
    items.sort(key=lambda item: (
        END_TO_END_MODULES.index(module_name(item)) if is_end_to_end(item)
        else len(END_TO_END_MODULES) + (module_name(item) not in with_slow_tests)))
