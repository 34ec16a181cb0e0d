"""The capacity dispatch with its experts split over a DTensor mesh: the same function as
on one device, and an all-to-all of the ideal size each way."""

import json
import os
import sys

import numpy as np
import pytest
import tensorflow as tf

from tests.test_lm import left_in, run_ok

LAYER_RUNNER = os.path.join(os.path.dirname(__file__), "dtensor_layer_runner.py")

# Mesh / gate / capacity_group_size (none: one group per device, 8 tokens).
CASES = ["batch:2,expert:2/top_k", "batch:1,expert:4/top_k/2",
         "batch:2,expert:2/hierarchical/4", "batch:1,expert:4/hierarchical",
         "batch:2,expert:2/balanced", "batch:1,expert:4/balanced/4"]


@pytest.fixture(scope="module")
def layer_runs():
    result = run_ok([sys.executable, LAYER_RUNNER, *CASES], timeout=600)
    lines = [json.loads(line) for line in result.stdout.splitlines()
             if line.startswith("{")]
    assert len(lines) == len(CASES), result.stdout[-2000:]
    return dict(zip(CASES, lines))


@pytest.mark.parametrize("case", CASES)
def test_expert_parallel_layer_equals_one_device(layer_runs, case):
    """Outputs, loss (with the balancing losses), every gradient and the dropped share,
    with capacity_factor 1 so that some assignments are dropped."""
    run = layer_runs[case]
    assert run["outputs"] < 1e-5 and run["loss"] < 1e-5, run
    for name, gap in run["gradients"].items():
        assert gap < 1e-5, (name, run)
    got, want = run["dropped_fraction"]
    assert got == pytest.approx(want, abs=1e-7) and want > 0.05, run


@pytest.mark.parametrize("mesh", ["batch:2,expert:2", "batch:1,expert:4"])
def test_dtensor_comm_lists_an_all_to_all_of_the_ideal_size(tmp_path, mesh):
    report_file = tmp_path / "comm.json"
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    run_ok([sys.executable, "-m", "benchmarks.dtensor_comm", f"--mesh={mesh}",
            "--tokens=256", "--model_dim=8", "--hidden_size=8", "--num_experts=8",
            f"--json={report_file}"], timeout=300, env=dict(os.environ, TMPDIR=str(scratch)))
    assert not left_in(scratch)
    report = json.loads(report_file.read_text())
    by_op = {}
    for collective in report["collectives"]:
        by_op.setdefault(collective["dtensor_op"], []).append(collective)
    # There and back, forward and backward; each the ideal's quarter.
    assert len(by_op["AllToAll"]) == 4
    assert report["all_to_all_bytes_sent"] == pytest.approx(report["ideal_all_to_all_bytes"])
    # The rest moves at most d per token of a batch shard (the combined outputs, the
    # inputs' gradient): no buffer of every expert's slots is gathered anywhere.
    tokens_per_batch_shard = 256 // int(mesh.split(",")[0].split(":")[1])
    for collective in by_op.get("AllGather", []):
        assert np.prod(collective["shape"]) <= tokens_per_batch_shard * 8, collective


def test_group_tokens_names_sizes_that_do_not_split():
    from tensorflow.experimental import dtensor

    from moe_tf import ExpertSharding

    mesh = dtensor.create_mesh([("batch", 1), ("expert", 1)], devices=["CPU:0"],
                               device_type="CPU")
    sharding = ExpertSharding(mesh)
    with pytest.raises(ValueError, match=r"capacity_group_size=4 must divide the tokens "
                                         r"per device \(6 = 6 tokens / 1 devices\)"):
        sharding.group_tokens(tf.zeros([6, 2]), 4)
    assert sharding.group_tokens(tf.zeros([6, 2]), 3).shape == (1, 1, 2, 3, 2)
