"""A model holding the layer, exported and served in a fresh process without moe_tf."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from moe_tf import SparselyGatedMoE
from tests.saved_model_runner import serve_in_fresh_process
from tests.test_sparsely_gated_moe import randomize


X = np.random.default_rng(2).normal(size=(3, 5, 4)).astype(np.float32)
GATES = {"flat_sparse": dict(num_experts=4, k=2),
         "hierarchical_capacity": dict(num_experts=8, k=2, num_groups=2,
                                       dispatch="capacity", capacity_factor=2.0),
         "balanced": dict(num_experts=4, k=2, gating="balanced")}
STORAGES = ("bfloat16", "int8")


def model_with_moe(**kwargs):
    """Deterministic: the same weights at every call."""
    inputs = keras.Input(shape=(5, 4))
    moe = SparselyGatedMoE(hidden_size=6, seed=0, **kwargs)
    model = keras.Model(inputs, keras.layers.Dense(
        3, kernel_initializer=keras.initializers.GlorotUniform(seed=2))(moe(inputs)))
    randomize(moe, seed=1)
    return model


def model_with_every_later_router():
    """A layer of each router after the paper (and the aux-loss-free bias and z-loss
    options), one after another."""
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
    return keras.Model(inputs, x)


def model_with_quantized_experts(storage):
    model = model_with_moe(num_experts=4, k=2)
    moe_layer(model).quantize_experts(storage)
    return model


def moe_layer(model):
    (moe,) = [layer for layer in model.layers if isinstance(layer, SparselyGatedMoE)]
    return moe


def save_with_signature(model, directory):
    """`tf.saved_model.save` with a serving signature: the path before `model.export`."""
    serve = tf.function(lambda x: model(x, training=False),
                        input_signature=[tf.TensorSpec([None, 5, 4], tf.float32)])
    tf.saved_model.save(model, str(directory), signatures=serve.get_concrete_function())


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Every model of this module exported, and served by one fresh process without
    moe_tf (TensorFlow starts once): maps (model, export) to (the model, its outputs
    here, the served outputs)."""
    tmp = tmp_path_factory.mktemp("served")
    models = {**{name: model_with_moe(**kwargs) for name, kwargs in GATES.items()},
              "later_routers": model_with_every_later_router(),
              **{storage: model_with_quantized_experts(storage) for storage in STORAGES}}
    exports = {}
    for name, model in models.items():
        exports[name, "export"] = tmp / name / "export"
        model.export(str(exports[name, "export"]), verbose=False)
        if name in GATES:
            exports[name, "saved_model"] = tmp / name / "saved_model"
            save_with_signature(model, exports[name, "saved_model"])
    np.save(tmp / "x.npy", X)
    outputs = {key: tmp / f"{key[0]}.{key[1]}.npy" for key in exports}
    serve_in_fresh_process([(exports[key], tmp / "x.npy", outputs[key]) for key in exports],
                           tmp)
    return {(name, export): (models[name], models[name](X, training=False).numpy(),
                             np.load(outputs[name, export])[0])
            for name, export in exports}


@pytest.mark.parametrize("export", ["export", "saved_model"])
@pytest.mark.parametrize("gate", list(GATES))
def test_exported_model_serves_identically_in_fresh_process(gate, export, served):
    _, expected, output = served[gate, export]
    np.testing.assert_allclose(output, expected, rtol=1e-6, atol=1e-6)


def test_every_later_router_serves_identically_in_fresh_process(served):
    _, expected, output = served["later_routers", "export"]
    np.testing.assert_allclose(output, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("storage", STORAGES)
def test_quantized_experts_round_trip_and_serve_in_fresh_process(storage, served,
                                                                 tmp_path):
    """Experts stored in bfloat16 / int8 (`quantize_experts`): a `.keras` file and a
    SavedModel served without moe_tf give the quantised model's outputs, close to the
    float32 model's."""
    model, expected, output = served[storage, "export"]
    float_outputs = model_with_moe(num_experts=4, k=2)(X, training=False).numpy()
    assert 0 < np.abs(expected - float_outputs).max() < 0.05 * np.abs(float_outputs).max()
    model.save(tmp_path / "model.keras")
    reloaded = keras.saving.load_model(tmp_path / "model.keras")
    np.testing.assert_array_equal(reloaded(X, training=False).numpy(), expected)
    np.testing.assert_allclose(output, expected, rtol=1e-6, atol=1e-6)
