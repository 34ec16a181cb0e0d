"""The training binary under faults, end to end with real signals and real files:
preemption (SIGTERM), kill -9, a checkpoint that cannot be written (the file size
limit of a full disk), checkpoints that are corrupt, and a step that diverges.

The loop's own answers to non-finite steps are tested in process in
tests/test_loop_faults.py; refused set-ups (bad data, unwritable directories) in
tests/test_lm.py."""

import re
import resource
import signal
import subprocess
import time

import numpy as np
import pytest
import tensorflow as tf

from tests.test_lm import ROOT, lm_command, metrics, run, run_ok

def start_and_signal(model_dir, flags, signal_number, after_checkpoint):
    """Starts (or resumes) a run, sends it `signal_number` once its checkpoint of step
    `after_checkpoint` exists, and returns the finished process and its stderr."""
    process = subprocess.Popen(lm_command(model_dir, *flags), cwd=ROOT,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.time() + 240
    while time.time() < deadline and process.poll() is None:
        if (model_dir / "checkpoints" / f"ckpt-{after_checkpoint}.index").exists():
            break
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be signalled"
    process.send_signal(signal_number)
    _, stderr = process.communicate(timeout=120)
    return process, stderr


def test_terminated_then_killed_run_resumes_to_the_same_loss(tmp_path):
    """SIGTERM (preemption) checkpoints the step under way and exits 143; the same
    command resumes there. kill -9 then loses only the steps since the last periodic
    checkpoint. Resumed once more, the run reaches the unbroken run's loss."""
    flags = ("--train_steps=30", "--checkpoint_every=5", "--log_every=10",
             "--export_dir=", "--noisy_gating=true", "--dropout=0.1")
    unbroken = tmp_path / "unbroken"
    run_ok(lm_command(unbroken, *flags))

    broken = tmp_path / "broken"
    process, stderr = start_and_signal(broken, flags, signal.SIGTERM, after_checkpoint=10)
    assert process.returncode == 143, stderr[-3000:]
    stopped = re.search(r"Stopped by SIGTERM at step (\d+)/30", stderr)
    assert stopped and "Traceback" not in stderr, stderr[-3000:]
    assert (broken / "checkpoints" / f"ckpt-{stopped.group(1)}.index").exists()
    assert not (broken / "metrics.json").exists()

    assert int(stopped.group(1)) < 25
    process, stderr = start_and_signal(broken, flags, signal.SIGKILL, after_checkpoint=25)
    assert "Resumed from" in stderr and f"at step {stopped.group(1)}." in stderr
    assert not (broken / "metrics.json").exists()

    resumed = run_ok(lm_command(broken, *flags))
    assert "Resumed from" in resumed.stderr
    got, want = metrics(broken), metrics(unbroken)
    assert got["global_step"] == want["global_step"] == 30
    assert got["final_train_loss"] == pytest.approx(want["final_train_loss"], rel=1e-6)
    assert got["valid_perplexity"] == pytest.approx(want["valid_perplexity"], rel=1e-6)


def limited_file_size(size):
    """A preexec_fn: files this process writes stop at `size` bytes (a write beyond
    fails with EFBIG, as one on a full disk fails with ENOSPC; Python ignores
    SIGXFSZ)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (size, size))


def checkpoint_file(model_dir, step):
    return model_dir / "checkpoints" / f"ckpt-{step}.data-00000-of-00001"


def test_checkpoint_faults_lose_nothing_already_saved(tmp_path):
    """A checkpoint that cannot be written stops the run, naming the directory, and the
    ones before it survive; a corrupt latest checkpoint is passed over for the one
    before it; if none can be read, the run stops instead of starting over."""
    model_dir = tmp_path / "run"
    flags = ("--checkpoint_every=5", "--log_every=5", "--export_dir=")
    run_ok(lm_command(model_dir, "--train_steps=10", *flags))

    # The checkpoint files are about 360 and 710 KB: the next one cannot be written.
    full = subprocess.run(lm_command(model_dir, "--train_steps=20", *flags), cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          preexec_fn=limited_file_size(300_000))
    assert full.returncode == 1, full.stderr[-3000:]
    last_line = full.stderr.strip().splitlines()[-1]
    assert re.search(rf"Cannot write the checkpoint of step 15 in {model_dir}: .*File too "
                     r"large\. Nothing earlier is lost \(the checkpoint of step 10 is "
                     r"kept\)", last_line), last_line
    assert "Traceback" not in full.stderr
    assert tf.train.latest_checkpoint(str(model_dir / "checkpoints")).endswith("ckpt-10")
    assert not list((model_dir / "checkpoints").rglob("*ckpt-15*"))  # no partial files
    tf.train.load_checkpoint(str(model_dir / "checkpoints" / "ckpt-10"))  # readable

    latest = checkpoint_file(model_dir, 10)
    latest.write_bytes(latest.read_bytes()[:latest.stat().st_size // 2])
    resumed = run_ok(lm_command(model_dir, "--train_steps=15", *flags))
    assert re.search(r"Cannot read the checkpoint \S+ckpt-10 \(.+\); trying the one before",
                     resumed.stderr), resumed.stderr[-3000:]
    assert "Resumed from" in resumed.stderr and "ckpt-5 at step 5." in resumed.stderr
    assert metrics(model_dir)["global_step"] == 15

    for step in (5, 10, 15):
        checkpoint_file(model_dir, step).write_bytes(b"not a checkpoint")
    unreadable = run(lm_command(model_dir, "--train_steps=20", *flags))
    assert unreadable.returncode == 1
    assert f"No checkpoint in {model_dir / 'checkpoints'} can be read" in unreadable.stderr
    assert "Traceback" not in unreadable.stderr


def test_a_diverging_run_stops_with_its_last_finite_checkpoint(tmp_path):
    """A learning rate of 1e30 sends every weight to ~1e30 at step 1: step 2's forward
    pass overflows to Inf and NaN. (At 1e4 the run used to crash in math.exp.) The
    default --nan_policy=stop; skip_step is tested in tests/test_loop_faults.py."""
    model_dir = tmp_path / "run"
    result = run(lm_command(model_dir, "--learning_rate=1e30", "--warmup_steps=0",
                            "--checkpoint_every=1", "--log_every=1", "--export_dir="))
    assert result.returncode == 1, result.stderr[-3000:]
    last_line = result.stderr.strip().splitlines()[-1]
    assert "Step 2 has a NaN or an Inf in the loss and the gradients of " in last_line
    assert "the checkpoint of step 1 is kept" in last_line
    assert "Traceback" not in result.stderr
    assert tf.train.latest_checkpoint(str(model_dir / "checkpoints")).endswith("ckpt-1")
    reader = tf.train.load_checkpoint(str(model_dir / "checkpoints" / "ckpt-1"))
    for name in reader.get_variable_to_shape_map():
        value = reader.get_tensor(name)
        if np.issubdtype(np.asarray(value).dtype, np.floating):
            assert np.isfinite(value).all(), name
    assert not (model_dir / "metrics.json").exists()
