"""Many command lines of a training binary in one process (one TensorFlow start): the
tests of refused set-ups (bad flags, data files, directories), and tiny training runs.

Run as a script, it calls a training binary's `main` once per command line, in order, and
prints how each ended, as JSON: `[{"status": ..., "stderr": ...}, ...]`:

    python tests/binary_runner.py MODULE '[["--flag=value", ...], ...]'

The flags are parsed and `main` is called as `absl.app.run` does it; a flag that absl
itself refuses is reported as app.run reports it ("FATAL Flags parsing error: ...",
status 1). Imported, it gives the tests `refused_setups_fixture` and `check_refused`,
and `command_lines_fixture`.
"""

import contextlib
import importlib
import io
import json
import os
import subprocess
import sys
import traceback

import numpy as np
import pytest
from absl import flags
from absl import logging as absl_logging

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def refused_setups_fixture(module, base_flags, cases):
    """A module fixture running every `(flags, message)` case's command line of binary
    `module` in one process: maps each case's flags to (its model_dir, exit status,
    stderr, the fixture's directory). `{tmp}` in the flags is that directory, which
    holds empty.txt, random.bin (2 MB of random bytes) and a_file (a plain file)."""
    @pytest.fixture(scope="module")
    def fixture(tmp_path_factory):
        tmp = tmp_path_factory.mktemp("refused")
        (tmp / "empty.txt").write_bytes(b"")
        (tmp / "random.bin").write_bytes(np.random.default_rng(0).bytes(2_000_000))
        (tmp / "a_file").write_text("")
        command_lines = [[*base_flags, f"--model_dir={tmp / str(i)}",
                          *flag.format(tmp=tmp).split()]
                         for i, (flag, _) in enumerate(cases)]
        ended = run_command_lines(module, command_lines)
        return {flag: (tmp / str(i), end["status"], end["stderr"], tmp)
                for i, ((flag, _), end) in enumerate(zip(cases, ended))}

    return fixture


def run_command_lines(module, command_lines):
    """Each command line's end, `{"status": ..., "stderr": ...}`, run in one child
    process."""
    result = subprocess.run([sys.executable, os.path.abspath(__file__), module,
                             json.dumps(command_lines)], cwd=ROOT,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def command_lines_fixture(module, base_flags, command_lines, prepare=None):
    """A module fixture running `command_lines` (lists of flags) of binary `module` in
    order, in one process: maps each command line's flags joined by spaces to (its end,
    the fixture's directory). `{tmp}` in the flags is that directory; `prepare(tmp)`
    writes there the files the command lines read, before they run."""
    @pytest.fixture(scope="module")
    def fixture(tmp_path_factory):
        tmp = tmp_path_factory.mktemp("runs")
        if prepare is not None:
            prepare(tmp)
        ends = run_command_lines(module, [
            [*base_flags, *(flag.format(tmp=tmp) for flag in line)]
            for line in command_lines])
        return {" ".join(line): (end, tmp) for line, end in zip(command_lines, ends)}

    return fixture


def check_refused(refused, flag, message):
    """The set-up `flag` ended before training, with `message` and no traceback; a
    refusal in one line ("Error: ...", status 2) leaves no run behind."""
    model_dir, status, stderr, tmp = refused[flag]
    if "/proc/sys" in flag and os.access("/proc/sys", os.W_OK):
        pytest.skip("/proc/sys is writable on this machine")
    message = message.format(tmp=tmp)
    assert status not in (0, "exception"), stderr[-2000:]
    assert message in stderr, stderr[-2000:]
    assert "Traceback" not in stderr
    assert not (model_dir / "checkpoints").exists()
    if message.startswith("Error: "):
        assert status == 2 and stderr.strip().splitlines()[-1].startswith(message)
        assert not (model_dir / "run_config.json").exists()


def run_command_line(binary, argv):
    """`binary.main` under the flags of `argv`: its exit status and its stderr."""
    flags.FLAGS.unparse_flags()
    stderr = io.StringIO()
    status = 0
    with contextlib.redirect_stderr(stderr):
        try:
            flags.FLAGS([binary.__name__, *argv])
            binary.main([])
        except flags.Error as error:
            print(f"FATAL Flags parsing error: {error}", file=sys.stderr)
            status = 1
        except SystemExit as exit_:
            status = exit_.code
        except Exception:  # pylint: disable=broad-except  (reported to the test)
            traceback.print_exc()
            status = "exception"
    return {"status": status, "stderr": stderr.getvalue()}


class _CurrentStderr:
    """A stream that writes wherever sys.stderr points at the time."""

    def write(self, text):
        return sys.stderr.write(text)

    def flush(self):
        sys.stderr.flush()


def main():
    sys.path.insert(0, ROOT)
    binary = importlib.import_module(sys.argv[1])
    binary.define_flags()
    absl_logging.use_absl_handler()
    # Log lines go into each command line's captured stderr.
    absl_logging.get_absl_handler().python_handler.stream = _CurrentStderr()
    results = [run_command_line(binary, argv) for argv in json.loads(sys.argv[2])]
    print(json.dumps(results))
    sys.stdout.flush()
    os._exit(0)  # TensorFlow's threads can delay a normal exit


if __name__ == "__main__":
    main()
