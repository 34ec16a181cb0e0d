"""What the binaries share on the command line: output kept to the project's own lines,
and errors in one line.

TensorFlow's start-up and run-time log lines (CUDA probing on CPU-only machines, graph
rewrites, checkpoint sharding timings, SavedModel signature renaming) would bury the
progress lines. A binary calls `quiet_tensorflow()` before it first imports TensorFlow:
the C++ logs are then off and TensorFlow's Python logger shows warnings and errors only.
absl's `--verbosity=1` (or `-v 1`) on the command line, or TF_CPP_MIN_LOG_LEVEL set in
the environment, keeps TensorFlow's logs as they are.

A set-up error (a missing file, a bad flag value found after parsing) ends the binary
with `exit_with_error`: one line naming the file or flag, status 2, no usage text.
Imports nothing heavy (the serving binaries use it without the training code).
"""

import contextlib
import logging
import os
import sys
from typing import Optional, Sequence


def asks_for_debug_logs(argv: Sequence[str]) -> bool:
    """Whether `argv` sets absl's verbosity to 1 or more (`--verbosity=N`,
    `--verbosity N`, `-v N`, `-vN`)."""
    for index, argument in enumerate(argv):
        value = None
        for prefix in ("--verbosity=", "-v="):
            if argument.startswith(prefix):
                value = argument[len(prefix):]
        if argument in ("--verbosity", "-v") and index + 1 < len(argv):
            value = argv[index + 1]
        elif argument.startswith("-v") and argument[2:].lstrip("-").isdigit():
            value = argument[2:]
        try:
            if value is not None and int(value) >= 1:
                return True
        except ValueError:
            pass  # absl reports the bad value itself
    return False


def quiet_tensorflow(argv: Optional[Sequence[str]] = None) -> None:
    """Imports TensorFlow with its own logs turned down, unless `argv` (default:
    sys.argv) or the environment asks for them (see the module docstring).

    Some of TensorFlow's start-up lines (CUDA probing) ignore TF_CPP_MIN_LOG_LEVEL, so
    the import runs with the process's stderr closed; a Python error of the import still
    shows, after it. TensorFlow's and Keras's Python INFO lines, some logged through
    absl's logger as the project's lines are, are then filtered by where they come from.
    """
    argv = sys.argv if argv is None else argv
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ or asks_for_debug_logs(argv):
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    with _stderr_closed():
        import tensorflow  # noqa: F401
    from absl import logging as absl_logging
    absl_logging.get_absl_handler().addFilter(_WarningsOfLibraries())
    logging.getLogger("tensorflow").setLevel(logging.WARNING)


class _WarningsOfLibraries(logging.Filter):
    """Keeps every record of the project and the warnings and errors of TensorFlow and
    Keras (their INFO lines would bury the progress lines)."""

    LIBRARIES = tuple(f"{os.sep}{name}{os.sep}" for name in ("tensorflow", "keras"))

    def filter(self, record: logging.LogRecord) -> bool:
        return (record.levelno >= logging.WARNING
                or not any(part in record.pathname for part in self.LIBRARIES))


@contextlib.contextmanager
def _stderr_closed():
    """File descriptor 2 points to /dev/null inside (C++ code writes there directly)."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def exit_with_error(message: str) -> None:
    """Ends the program with `message` as one line on stderr and status 2."""
    sys.stderr.write(f"Error: {message}\n")
    sys.stderr.flush()
    sys.exit(2)
