"""recompute_activations: the same outputs and gradients on both dispatch paths; the
sparse path against the capacity path with large blocks of rows per expert."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from moe_tf import FeedForwardExperts, SparselyGatedMoE


def with_same_random_weights(*layers):
    """Builds the layers for 5 input features and gives them all the same weights."""
    rng = np.random.default_rng(0)
    for layer in layers:
        layer.build((None, 5))
    for weights in zip(*(layer.weights for layer in layers)):
        value = rng.normal(size=weights[0].shape).astype(np.float32)
        for weight in weights:
            weight.assign(value)
    return layers


def outputs_and_gradients(layer, x):
    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(tf.sin(tf.cast(y, tf.float32))) + tf.add_n(layer.losses)
        return y, tape.gradient(loss, [x] + layer.trainable_weights)

    y, grads = step(x)
    return [y] + grads


@pytest.mark.parametrize("config", [
    dict(num_experts=12, k=2),  # 7 tokens: some experts get no rows
    dict(num_experts=12, k=2, dispatch="capacity", capacity_factor=1.0),
    dict(num_experts=12, k=2, num_groups=3, group_k=2),
])
def test_same_outputs_and_gradients(config):
    x = tf.constant(np.random.default_rng(1).normal(size=(7, 5)).astype(np.float32))
    layers = with_same_random_weights(*(
        SparselyGatedMoE(hidden_size=6, noisy_gating=False, recompute_activations=flag,
                         **config) for flag in (False, True)))
    kept, recomputed = (outputs_and_gradients(layer, x) for layer in layers)
    for a, b in zip(kept, recomputed):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-6, atol=1e-6)


def test_config_round_trip():
    layer = SparselyGatedMoE(4, 2, 6, recompute_activations=True)
    config = layer.get_config()
    assert config["recompute_activations"] is True
    assert SparselyGatedMoE.from_config(config).recompute_activations is True
    experts = FeedForwardExperts(num_experts=3, hidden_size=4, output_size=2,
                                 recompute_activations=True)
    assert FeedForwardExperts.from_config(experts.get_config()).recompute_activations


def test_mixed_bfloat16():
    layer = SparselyGatedMoE(4, 2, 6, recompute_activations=True,
                             dtype=keras.DTypePolicy("mixed_bfloat16"))
    x = tf.constant(np.random.default_rng(2).normal(size=(9, 5)).astype(np.float32))
    y, *grads = outputs_and_gradients(layer, x)
    assert y.dtype == tf.bfloat16
    assert all(np.all(np.isfinite(tf.cast(g, tf.float32).numpy())) for g in grads)


@pytest.mark.parametrize("recompute", [False, True])
def test_large_expert_blocks_match_the_capacity_path(recompute):
    """About 150 rows per expert: the experts' backward takes its large-block branch."""
    x = tf.constant(np.random.default_rng(3).normal(size=(300, 5)).astype(np.float32))
    config = dict(num_experts=2, k=1, hidden_size=6, noisy_gating=False)
    sparse, capacity = with_same_random_weights(
        SparselyGatedMoE(recompute_activations=recompute, **config),
        SparselyGatedMoE(dispatch="capacity", capacity_factor=2.0, **config))
    counts = np.bincount(np.argmax(x.numpy() @ sparse.w_gate.numpy(), -1), minlength=2)
    assert counts.min() >= 128, counts
    for a, b in zip(outputs_and_gradients(sparse, x), outputs_and_gradients(capacity, x)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-4)
