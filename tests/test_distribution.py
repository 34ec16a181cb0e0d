"""Every --strategy trains the same model to the same loss as one device."""

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.test_lm import ROOT, lm_command, metrics, run_ok

# No noise and no dropout: the runs must agree to float32 summation order.
EXACT = ("--noisy_gating=false", "--dropout=0", "--train_steps=8", "--log_every=4",
         "--export_dir=", "--seed=3")


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("default")
    run_ok(lm_command(model_dir, *EXACT))
    return metrics(model_dir)


def assert_same_run(a, b):
    assert a["global_step"] == b["global_step"]
    for key in ("final_train_loss", "valid_perplexity"):
        assert a[key] == pytest.approx(b[key], rel=1e-5), key


def test_mirrored_matches_one_device(default_run, tmp_path):
    run_ok(lm_command(tmp_path, *EXACT, "--strategy=mirrored", "--num_cpu_devices=2"))
    assert_same_run(metrics(tmp_path), default_run)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_multi_worker_on_localhost_matches_one_device(default_run, tmp_path):
    cluster = {"worker": [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]}
    processes = []
    for index in range(2):
        env = dict(os.environ, TF_CONFIG=json.dumps(
            {"cluster": cluster, "task": {"type": "worker", "index": index}}))
        processes.append(subprocess.Popen(
            lm_command(tmp_path, *EXACT, "--strategy=multi_worker"), cwd=ROOT, env=env,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        for process in processes:
            _, stderr = process.communicate(timeout=300)
            assert process.returncode == 0, stderr[-3000:]
    finally:
        for process in processes:
            process.kill()
    assert_same_run(metrics(tmp_path), default_run)
    # Only the chief (worker 0) writes into --model_dir.
    assert sorted(os.listdir(tmp_path / "checkpoints")).count("checkpoint") == 1


def test_multi_worker_without_tf_config_is_refused(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    result = subprocess.run(lm_command(tmp_path, "--strategy=multi_worker"), cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "TF_CONFIG" in result.stderr and "Traceback" not in result.stderr


def test_checkpoint_from_mirrored_resumes_on_one_device(default_run, tmp_path):
    flags = [f for f in EXACT if not f.startswith("--train_steps")]
    run_ok(lm_command(tmp_path, *flags, "--train_steps=4", "--strategy=mirrored",
                      "--num_cpu_devices=2"))
    resumed = run_ok(lm_command(tmp_path, *flags, "--train_steps=8"))
    assert "Resumed from" in resumed.stderr and "at step 4" in resumed.stderr
    assert_same_run(metrics(tmp_path), default_run)
