"""Every --strategy trains the same model to the same loss as one device."""

import json
import os
import socket
import subprocess
import sys

import pytest

from tests.test_lm import (ROOT, assert_export_serves_the_checkpoint, left_in, lm_command,
                           metrics, run_ok)

DTENSOR_SHARDS_RUNNER = os.path.join(os.path.dirname(__file__), "dtensor_shards_runner.py")

# No noise and no dropout: the runs must agree to float32 summation order.
EXACT = ("--noisy_gating=false", "--dropout=0", "--train_steps=8", "--log_every=4",
         "--export_dir=", "--seed=3")


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    model_dir = tmp_path_factory.mktemp("default")
    run_ok(lm_command(model_dir, *EXACT))
    return metrics(model_dir)


def assert_same_run(a, b, *, perplexity_rel=1e-5):
    """Same steps and training loss (to 1e-5); held-out perplexity to `perplexity_rel`.

    The weights after the last update can differ by more than the losses did: Adam turns
    summation-order noise in near-zero gradients into full-size steps (seen under DTensor,
    whose programs sum in another order).
    """
    assert a["global_step"] == b["global_step"]
    assert a["final_train_loss"] == pytest.approx(b["final_train_loss"], rel=1e-5)
    assert a["valid_perplexity"] == pytest.approx(b["valid_perplexity"],
                                                  rel=perplexity_rel)


def test_mirrored_matches_one_device(default_run, tmp_path):
    run_ok(lm_command(tmp_path, *EXACT, "--strategy=mirrored", "--num_cpu_devices=2"))
    assert_same_run(metrics(tmp_path), default_run)


def run_processes_ok(command, environments, *, timeout):
    """Runs `command` once per environment (added to this one), all at once, as the
    workers or clients of one job; each must succeed."""
    processes = [subprocess.Popen(command, cwd=ROOT, env=dict(os.environ, **environment),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True)
                 for environment in environments]
    try:
        for process in processes:
            _, stderr = process.communicate(timeout=timeout)
            assert process.returncode == 0, stderr[-3000:]
    finally:
        for process in processes:
            process.kill()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_multi_worker_on_localhost_matches_one_device(default_run, tmp_path):
    cluster = {"worker": [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]}
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    run_processes_ok(lm_command(tmp_path / "run", *EXACT, "--strategy=multi_worker"),
                     [{"TMPDIR": str(scratch),
                       "TF_CONFIG": json.dumps({"cluster": cluster,
                                                "task": {"type": "worker", "index": index}})}
                      for index in range(2)], timeout=300)
    assert_same_run(metrics(tmp_path / "run"), default_run)
    # Only the chief (worker 0) writes into --model_dir; the other's scratch is removed.
    assert sorted(os.listdir(tmp_path / "run" / "checkpoints")).count("checkpoint") == 1
    assert not left_in(scratch)


def test_multi_worker_without_tf_config_is_refused(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TF_CONFIG"}
    result = subprocess.run(lm_command(tmp_path, "--strategy=multi_worker"), cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "TF_CONFIG" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("mesh, message", [
    (None, "--strategy=dtensor needs --mesh"),
    ("batch:2,expert:2", "needs 4 devices"),
])
def test_dtensor_placement_names_a_missing_or_unfitting_mesh(mesh, message):
    from train import distribution
    with pytest.raises(ValueError, match=message):
        distribution.make_placement("dtensor", mesh=mesh)


def test_checkpoint_from_mirrored_resumes_on_one_device(default_run, tmp_path):
    flags = [f for f in EXACT if not f.startswith("--train_steps")]
    run_ok(lm_command(tmp_path, *flags, "--train_steps=4", "--strategy=mirrored",
                      "--num_cpu_devices=2"))
    resumed = run_ok(lm_command(tmp_path, *flags, "--train_steps=8"))
    assert "Resumed from" in resumed.stderr and "at step 4" in resumed.stderr
    assert_same_run(metrics(tmp_path), default_run)


# The experts run on fixed-size buffers under DTensor, each device routing its own share
# of the batch in groups. The one-device runs route the same groups: sentences of at most
# 6 pieces (8 ids with bos and eos) padded to 8, as the DTensor placement pads them, give
# the model rows of 7 tokens, and groups of 7 divide every device's share. One slot per
# assignment on average (capacity_factor 1): some assignments are dropped, and the runs
# must drop the same. Windows of 2 steps, so that the checkpoint test's last leg reports
# the same window.
CAPACITY = ("--dispatch=capacity", "--capacity_factor=1", "--max_length=6",
            "--length_multiple=8", "--capacity_group_size=7", "--log_every=2",
            "--max_eval_batches=2")
DTENSOR = ("--strategy=dtensor", "--num_cpu_devices=4")


@pytest.fixture(scope="module")
def capacity_run(tmp_path_factory):
    """The one-device run with the capacity dispatch, flat gate. (Every gate's equality
    with one device, with drops, on both meshes: tests/test_expert_sharding.py, on the
    layer; a hierarchical binary run on batch:2,expert:2 agreed too when measured, and
    the translation test below runs the balanced gate.)"""
    model_dir = tmp_path_factory.mktemp("capacity")
    run_ok(lm_command(model_dir, *EXACT, *CAPACITY))
    return metrics(model_dir)


def test_dtensor_matches_one_device(capacity_run, tmp_path):
    """On batch:2,expert:2; batch:1,expert:4 is the mesh of the checkpoint and
    multi-client tests below, which compare with the same run."""
    mesh = "batch:2,expert:2"
    flags = [f for f in EXACT if f != "--export_dir="]
    result = run_ok(lm_command(tmp_path, *flags, *CAPACITY, *DTENSOR, f"--mesh={mesh}"))
    assert_same_run(metrics(tmp_path), capacity_run, perplexity_rel=1e-4)
    # The same assignments were dropped (metrics.json: the last window's statistics).
    dropped = metrics(tmp_path)["balance"]["moe/dropped_fraction"]
    assert dropped == pytest.approx(capacity_run["balance"]["moe/dropped_fraction"],
                                    abs=1e-6)
    assert dropped > 0.01
    # The start-up log names the mesh and every expert weight's layout and shard.
    assert f"strategy dtensor on mesh {mesh} (4 local CPU devices" in result.stderr
    for name, shape in (("kernel_in", (4, 32, 32)), ("bias_in", (4, 32)),
                        ("kernel_out", (4, 32, 32)), ("bias_out", (4, 32))):
        shard = (2,) + shape[1:]
        specs = ["expert"] + ["unsharded"] * (len(shape) - 1)
        assert (f"moe/experts/{name} {shape} layout {specs}, shard per device {shard}"
                in result.stderr), name
    # Trained under DTensor, exported for one device: served in a fresh process.
    assert_export_serves_the_checkpoint(tmp_path, tmp_path)


def test_checkpoint_moves_between_meshes(capacity_run, tmp_path):
    """batch:2,expert:2 -> batch:1,expert:4 -> one device -> batch:2,expert:2, two steps
    each, equals the unbroken one-device run: every expert's weights and optimizer slots
    land on the right device whatever the expert-parallel size before."""
    flags = [f for f in EXACT if not f.startswith("--train_steps")]
    legs = [("--mesh=batch:2,expert:2", *DTENSOR), ("--mesh=batch:1,expert:4", *DTENSOR),
            (), ("--mesh=batch:2,expert:2", *DTENSOR)]
    for leg, placement in enumerate(legs):
        result = run_ok(lm_command(tmp_path, *flags, *CAPACITY, *placement,
                                   f"--train_steps={2 * (leg + 1)}"))
        if leg:
            assert f"at step {2 * leg}" in result.stderr
    assert_same_run(metrics(tmp_path), capacity_run, perplexity_rel=1e-4)


def test_dtensor_places_each_expert_on_one_device_of_its_column():
    result = run_ok([sys.executable, DTENSOR_SHARDS_RUNNER], timeout=300)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["mesh"] == {"batch": 2, "expert": 2}
    # Experts 0-3 of 8: devices 0 and 2 (expert coordinate 0), 4-7: devices 1 and 3.
    for name in ("moe/experts/kernel_in", "moe/experts/bias_out",
                 "adam/moe_experts_kernel_in_momentum",
                 "adam/moe_experts_kernel_out_velocity"):
        shards = report["variables"][name]
        assert [s["experts"] for s in shards] == [[0, 4], [4, 8], [0, 4], [4, 8]], name
        assert all(s["matches_global_slice"] for s in shards), name
    for name in ("softmax/kernel", "moe/gate/w_gate", "adam/softmax_kernel_momentum",
                 "adam/iteration"):
        shards = report["variables"][name]
        assert all(s["shape"] == report["global_shapes"][name] for s in shards), name
        assert all(s["matches_global_slice"] for s in shards), name


def test_two_dtensor_clients_on_localhost_match_one_device(capacity_run, tmp_path):
    """Multi-client DTensor: two processes on 127.0.0.1 with 2 logical CPUs each, mesh
    batch:1,expert:4 (neither client holds every expert). Both write their shards into
    the one checkpoint; one device resumes from it and evaluates the same model."""
    ports = [free_port(), free_port()]
    command = lm_command(tmp_path, *EXACT, *CAPACITY, "--strategy=dtensor",
                         "--num_cpu_devices=2", "--mesh=batch:1,expert:4")
    run_processes_ok(command, [{"DTENSOR_JOBS": ",".join(f"127.0.0.1:{p}" for p in ports),
                                "DTENSOR_NUM_CLIENTS": "2", "DTENSOR_CLIENT_ID": str(client)}
                               for client in range(2)], timeout=400)
    two_clients = metrics(tmp_path)
    assert_same_run(two_clients, capacity_run, perplexity_rel=1e-4)
    # Every expert's shard is in the checkpoint: one device restores it whole.
    restored = run_ok(lm_command(tmp_path, *EXACT, *CAPACITY))
    assert "at step 8" in restored.stderr
    assert metrics(tmp_path)["valid_perplexity"] == pytest.approx(
        two_clients["valid_perplexity"], rel=1e-6)


# The translation model under DTensor: both MoE layers, the bidirectional encoder.
NMT_EXACT = ("--dropout=0", "--seed=3", "--train_steps=2", "--log_every=1",
             "--export_dir=", "--bleu_sentences=0", "--dispatch=capacity",
             "--capacity_factor=2", "--length_multiple=8", "--max_eval_batches=2")


def test_translation_model_under_dtensor_matches_one_device(tmp_path):
    """With its default balanced gate. (Top-k without noise on batch:1,expert:4 agreed
    too when measured.)"""
    def nmt(model_dir, *flags):
        return [sys.executable, "-m", "train.nmt", "--preset=tiny",
                f"--model_dir={model_dir}", *NMT_EXACT, *flags]

    run_ok(nmt(tmp_path / "one"))
    run_ok(nmt(tmp_path / "mesh", *DTENSOR, "--mesh=batch:2,expert:2"))
    one, on_mesh = metrics(tmp_path / "one"), metrics(tmp_path / "mesh")
    assert_same_run(on_mesh, one, perplexity_rel=1e-4)
    for layer in ("encoder_moe", "decoder_moe"):
        assert on_mesh["balance"][f"{layer}/cv_importance"] == pytest.approx(
            one["balance"][f"{layer}/cv_importance"], rel=1e-4)


def test_dtensor_refuses_an_rnn_reversed_by_tf_reverse():
    import keras

    from train import distribution

    placement = distribution.make_placement("dtensor", mesh="batch:1,expert:1")
    tokens = keras.Input((5, 3))
    model = keras.Model(tokens, keras.layers.LSTM(4, go_backwards=True, name="back")(tokens))
    with pytest.raises(ValueError, match="layer 'back' runs backwards in time with "
                                         "tf.reverse"):
        placement.place(model, keras.optimizers.SGD())
