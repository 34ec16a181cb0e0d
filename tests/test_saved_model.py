"""A model holding the layer, exported and served in a fresh process without moe_tf."""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

from moe_tf import SparselyGatedMoE
from tests.test_sparsely_gated_moe import randomize

RUNNER = os.path.join(os.path.dirname(__file__), "saved_model_runner.py")


def serve_in_fresh_process(saved_model_dir, x, tmp_path):
    input_path, output_path = tmp_path / "x.npy", tmp_path / "y.npy"
    np.save(input_path, x)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run([sys.executable, RUNNER, str(saved_model_dir), str(input_path),
                    str(output_path)], check=True, env=env, cwd=tmp_path, timeout=300)
    (output,) = np.load(output_path)
    return output


def assert_export_serves(model, x, expected, tmp_path, *, tolerance):
    """`model.export` served in a fresh process (without moe_tf) gives `expected`."""
    export_dir = tmp_path / "export"
    model.export(str(export_dir), verbose=False)
    np.testing.assert_allclose(serve_in_fresh_process(export_dir, x, tmp_path),
                               expected, rtol=tolerance, atol=tolerance)


def model_with_moe(**kwargs):
    inputs = keras.Input(shape=(5, 4))
    moe = SparselyGatedMoE(hidden_size=6, seed=0, **kwargs)
    model = keras.Model(inputs, keras.layers.Dense(3)(moe(inputs)))
    randomize(moe, seed=1)
    return model


@pytest.mark.parametrize("kwargs", [
    dict(num_experts=4, k=2),
    dict(num_experts=8, k=2, num_groups=2, dispatch="capacity", capacity_factor=2.0),
    dict(num_experts=4, k=2, gating="balanced"),
], ids=["flat_sparse", "hierarchical_capacity", "balanced"])
def test_exported_model_serves_identically_in_fresh_process(kwargs, tmp_path):
    model = model_with_moe(**kwargs)
    x = np.random.default_rng(2).normal(size=(3, 5, 4)).astype(np.float32)
    expected = model(x, training=False).numpy()
    assert_export_serves(model, x, expected, tmp_path, tolerance=1e-6)

    saved_dir = tmp_path / "saved_model"
    serve = tf.function(lambda x: model(x, training=False),
                        input_signature=[tf.TensorSpec([None, 5, 4], tf.float32)])
    tf.saved_model.save(model, str(saved_dir), signatures=serve.get_concrete_function())
    np.testing.assert_allclose(
        serve_in_fresh_process(saved_dir, x, tmp_path),
        expected, rtol=1e-6, atol=1e-6)


def test_every_later_router_serves_identically_in_fresh_process(tmp_path):
    """One model with a layer of each router after the paper (and the aux-loss-free bias
    and z-loss options), exported and served without moe_tf."""
    inputs = keras.Input(shape=(5, 4))
    x = inputs
    for i, settings in enumerate([
            dict(num_experts=4, k=1, gating="switch"),
            dict(num_experts=4, k=2, gating="top_p", top_p_threshold=0.5,
                 dispatch="capacity"),
            dict(num_experts=4, k=2, gating="expert_choice"),
            dict(num_experts=4, k=2, bias_update_rate=0.1, router_z_loss_weight=0.01)]):
        moe = SparselyGatedMoE(hidden_size=6, seed=0, name=f"moe_{i}", **settings)
        x = x + moe(x)
        randomize(moe, seed=i)
        if settings.get("bias_update_rate"):
            moe.gate.expert_bias.assign([0.5, -0.5, 0.0, 1.0])
    model = keras.Model(inputs, x)
    x = np.random.default_rng(2).normal(size=(3, 5, 4)).astype(np.float32)
    expected = model(x, training=False).numpy()
    assert_export_serves(model, x, expected, tmp_path, tolerance=1e-5)


@pytest.mark.parametrize("storage", ["bfloat16", "int8"])
def test_quantized_experts_round_trip_and_serve_in_fresh_process(storage, tmp_path):
    """Experts stored in bfloat16 / int8 (`quantize_experts`): a `.keras` file and a
    SavedModel served without moe_tf give the quantised model's outputs, close to the
    float32 model's."""
    model = model_with_moe(num_experts=4, k=2)
    x = np.random.default_rng(2).normal(size=(3, 5, 4)).astype(np.float32)
    float_outputs = model(x, training=False).numpy()
    moe = [layer for layer in model.layers if isinstance(layer, SparselyGatedMoE)][0]
    moe.quantize_experts(storage)
    expected = model(x, training=False).numpy()
    assert 0 < np.abs(expected - float_outputs).max() < 0.05 * np.abs(float_outputs).max()
    model.save(tmp_path / "model.keras")
    reloaded = keras.saving.load_model(tmp_path / "model.keras")
    np.testing.assert_array_equal(reloaded(x, training=False).numpy(), expected)
    assert_export_serves(model, x, expected, tmp_path, tolerance=1e-6)
