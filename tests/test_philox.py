"""moe_tf.philox: Keras's random draws with Philox named, for XLA."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from moe_tf import NoisyTopKGate, PhiloxDropout, philox
from tests.layer_test_helper import run_layer_test, seed_scrambling_xors


def test_normal_draws_keras_normal_of_its_seed():
    ours, keras_generator = keras.random.SeedGenerator(7), keras.random.SeedGenerator(7)
    for _ in range(2):  # the generators advance alike
        np.testing.assert_array_equal(philox.normal([64, 8], ours),
                                      keras.random.normal([64, 8], seed=keras_generator))


def test_normal_under_xla_is_fresh_standard_normal_without_seed_scrambling():
    generator = keras.random.SeedGenerator(7)
    draw = tf.function(lambda: philox.normal([512, 256], generator), jit_compile=True)
    first, second = draw().numpy(), draw().numpy()
    for sample in (first, second):
        assert abs(sample.mean()) < 0.01 and abs(sample.std() - 1) < 0.01
        assert abs(np.corrcoef(sample[:, :-1].ravel(), sample[:, 1:].ravel())[0, 1]) < 0.01
    assert abs(np.corrcoef(first.ravel(), second.ravel())[0, 1]) < 0.01
    seed = tf.constant([3, 4])
    assert seed_scrambling_xors(
        lambda s: tf.random.stateless_normal([64, 8], seed=s, alg="philox"), seed) == 0
    # The broken variant, TensorFlow's choice, is what the check is for.
    assert seed_scrambling_xors(lambda s: tf.random.stateless_normal([64, 8], seed=s),
                                seed) > 0


@pytest.mark.parametrize("noise_shape", [None, (None, 1, None)])
def test_dropout_draws_keras_dropout_masks(noise_shape):
    x = np.random.default_rng(0).normal(size=(4, 6, 8)).astype(np.float32)
    ours = PhiloxDropout(0.3, noise_shape=noise_shape, seed=5)
    theirs = keras.layers.Dropout(0.3, noise_shape=noise_shape, seed=5)
    for _ in range(2):  # and their seed generators advance alike
        dropped = ours(x, training=True).numpy()
        np.testing.assert_array_equal(dropped, theirs(x, training=True))
    assert 0 < np.mean(dropped == 0) < 1
    if noise_shape is not None:  # one mask for every step of a sequence
        assert (dropped == 0).all(axis=1).sum() == (dropped == 0).any(axis=1).sum()
    np.testing.assert_array_equal(ours(x, training=False), x)
    np.testing.assert_array_equal(PhiloxDropout(1.0)(x, training=True), np.zeros_like(x))


def test_dropout_under_xla_keeps_one_minus_rate_scaled_without_seed_scrambling():
    x = tf.ones([256, 512])
    layer, keras_layer = PhiloxDropout(0.25, seed=1), keras.layers.Dropout(0.25, seed=1)
    masks = tf.function(lambda x: layer(x, training=True), jit_compile=True)
    first, second = masks(x).numpy(), masks(x).numpy()
    for mask in (first, second):
        np.testing.assert_allclose(np.unique(mask), [0, 1 / 0.75], rtol=1e-6)
        assert abs(np.mean(mask == 0) - 0.25) < 0.01
    assert 0.5 < np.mean(first == second) < 0.7  # fresh masks: 0.75^2 + 0.25^2 agree
    assert seed_scrambling_xors(lambda x: layer(x, training=True), x) == 0
    assert seed_scrambling_xors(lambda x: keras_layer(x, training=True), x) > 0


def test_dropout_layer():
    run_layer_test(PhiloxDropout, init_kwargs={"rate": 0.5, "seed": 3},
                   input_data=np.ones((2, 3, 4), np.float32),
                   expected_output_shape=(2, 3, 4), run_training_test=False,
                   expected_num_trainable_weights=0)


def test_noisy_gate_draws_its_noise_with_philox_named():
    gate = NoisyTopKGate(num_experts=4, k=2, seed=7)
    gate.build((None, 3))
    x = tf.ones([16, 3])
    assert seed_scrambling_xors(lambda x: gate(x, training=True).importance, x) == 0
