"""The gating math of moe_tf.gating against NumPy references."""

import numpy as np
import pytest
import tensorflow as tf

from moe_tf import gating
from tests import numpy_reference as ref


def test_top_k_gates_without_noise_match_numpy():
    logits = np.array([[0.1, 2.0, -1.0, 0.5, 1.5],
                       [3.0, -2.0, 0.0, 0.2, 0.1],
                       [0.0, 0.0, 1.0, -1.0, 4.0]], np.float32)
    for k in (1, 2, 3, 5):
        result = gating.noisy_top_k_gating(tf.constant(logits), k)
        dense = np.zeros_like(logits)
        for t in range(logits.shape[0]):
            dense[t, result.index.numpy()[t]] = result.gate.numpy()[t]
        np.testing.assert_allclose(dense, ref.top_k_gates(logits, k), rtol=1e-6)
        np.testing.assert_allclose(result.gate.numpy().sum(-1), 1.0, rtol=1e-6)
        # Without noise the load contribution is the 0/1 selection indicator.
        np.testing.assert_array_equal(result.load.numpy(), (dense > 0).astype(np.float32))


def test_top_k_equals_tf_top_k_and_stays_xlas_top_k_under_a_gradient():
    rng = np.random.default_rng(4)
    values = tf.constant(rng.normal(size=(64, 32)).astype(np.float32))
    upstream = tf.constant(rng.normal(size=(64, 4)).astype(np.float32))

    def outputs_and_gradient(top_k, values):
        with tf.GradientTape() as tape:
            tape.watch(values)
            top_values, index = top_k(values, 5)
            # As the gate uses them: the top k's softmax and the (k + 1)-th value.
            loss = (tf.reduce_sum(tf.nn.softmax(top_values[:, :4]) * upstream)
                    + tf.reduce_sum(top_values[:, 4]))
        return top_values, index, tape.gradient(loss, values)

    for ours, theirs in zip(outputs_and_gradient(gating.top_k, values),
                            outputs_and_gradient(lambda v, k: tf.math.top_k(v, k=k), values)):
        np.testing.assert_array_equal(ours, theirs)


def test_noisy_gating_compiles_to_xlas_top_k_with_its_gradients():
    rng = np.random.default_rng(5)
    inputs = tf.constant(rng.normal(size=(64, 8)).astype(np.float32))
    noise = tf.constant(rng.normal(size=(64, 32)).astype(np.float32))
    target = tf.constant(rng.normal(size=(64, 4)).astype(np.float32))

    def gradients(w_gate, w_noise):
        with tf.GradientTape() as tape:
            tape.watch([w_gate, w_noise])
            gating_out = gating.noisy_top_k_gating(
                inputs @ w_gate, 4, noise=noise,
                stddev=tf.nn.softplus(inputs @ w_noise) + 0.01)
            loss = (tf.reduce_sum(gating_out.gate * tf.cast(gating_out.index, tf.float32)
                                  * target) + tf.reduce_sum(gating_out.load ** 2))
        return tape.gradient(loss, [w_gate, w_noise])

    weights = [tf.constant(rng.normal(size=(8, 32)).astype(np.float32)) for _ in range(2)]
    hlo = tf.function(gradients, jit_compile=True).experimental_get_compiler_ir(
        *weights)(stage="optimized_hlo")
    # A sort of whole rows costs 35x XLA's TopK on CPU at [4096, 512].
    assert 'custom_call_target="TopK"' in hlo and " sort(" not in hlo


def test_kth_excluding_matches_numpy():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(6, 7)).astype(np.float32)
    values[0] = [3, 3, 1, 1, 0, -1, 5]  # ties around the boundary
    for k in (1, 2, 3, 6):
        np.testing.assert_allclose(gating.kth_excluding(tf.constant(values), k).numpy(),
                                   ref.kth_excluding(values, k))


def test_kth_excluding_rejects_k_out_of_range():
    with pytest.raises(ValueError, match="k"):
        gating.kth_excluding(tf.zeros([2, 3]), 3)


def test_smooth_load_matches_monte_carlo():
    """P(x, i) is the chance that i stays in the top k when only its own noise is redrawn."""
    rng = np.random.default_rng(1)
    n, k, samples = 6, 2, 100_000
    clean = rng.normal(size=(1, n))
    stddev = ref.softplus(rng.normal(size=(1, n))) + 1e-2
    noisy = clean + rng.normal(size=(1, n)) * stddev
    p = gating.smooth_load(tf.constant(clean), tf.constant(noisy), tf.constant(stddev),
                           k).numpy()[0]
    for i in range(n):
        fresh = clean[0, i] + rng.normal(size=samples) * stddev[0, i]
        others = np.delete(noisy[0], i)
        kth_other = np.sort(others)[::-1][k - 1]
        estimate = np.mean(fresh > kth_other)
        assert abs(p[i] - estimate) < 0.01, (i, p[i], estimate)


def test_noisy_gating_load_is_smooth_load():
    rng = np.random.default_rng(2)
    clean = tf.constant(rng.normal(size=(5, 8)))
    raw = tf.constant(rng.normal(size=(5, 8)))
    noise = tf.constant(rng.normal(size=(5, 8)))
    stddev = gating.noise_stddev(raw)
    result = gating.noisy_top_k_gating(clean, 3, noise=noise, stddev=stddev)
    expected = gating.smooth_load(clean, clean + noise * stddev, stddev, 3)
    np.testing.assert_allclose(result.load.numpy(), expected.numpy())
    np.testing.assert_allclose(stddev.numpy(), ref.softplus(raw.numpy()) + 1e-2)
    # The gate is the softmax of the k largest *noisy* logits.
    np.testing.assert_allclose(
        np.sort(result.gate.numpy(), -1),
        np.sort(ref.top_k_gates((clean + noise * stddev).numpy(), 3), -1)[:, -3:],
        rtol=1e-6)


def test_cv_squared_matches_numpy():
    for values in ([1.0, 1.0, 1.0], [0.0, 2.0, 4.0, 10.0], [5.0], [0.0, 0.0]):
        np.testing.assert_allclose(gating.cv_squared(tf.constant(values)).numpy(),
                                   ref.cv_squared(values), rtol=1e-6)


def test_balancing_loss_weights_each_term_once():
    importance = tf.constant([1.0, 3.0])
    load = tf.constant([2.0, 2.0, 8.0])
    loss = gating.balancing_loss(importance, load, importance_weight=0.3, load_weight=0.7)
    expected = 0.3 * ref.cv_squared([1, 3]) + 0.7 * ref.cv_squared([2, 2, 8])
    np.testing.assert_allclose(loss.numpy(), expected, rtol=1e-6)


def test_load_loss_gradient_matches_finite_differences():
    rng = np.random.default_rng(3)
    tokens, d, n, k = 16, 3, 5, 2
    x = tf.constant(rng.normal(size=(tokens, d)))
    w_noise = tf.constant(rng.normal(size=(d, n)) * 0.3)
    noise = tf.constant(rng.normal(size=(tokens, n)))

    def load_loss(w_gate):
        clean = tf.matmul(x, w_gate)
        stddev = gating.noise_stddev(tf.matmul(x, w_noise))
        result = gating.noisy_top_k_gating(clean, k, noise=noise, stddev=stddev)
        return gating.cv_squared(tf.reduce_sum(result.load, 0))

    w_gate = tf.Variable(rng.normal(size=(d, n)) * 0.3)
    with tf.GradientTape() as tape:
        loss = load_loss(w_gate)
    analytic = tape.gradient(loss, w_gate).numpy()
    numeric = np.zeros_like(analytic)
    h = 1e-6
    base = w_gate.numpy()
    for idx in np.ndindex(base.shape):
        plus, minus = base.copy(), base.copy()
        plus[idx] += h
        minus[idx] -= h
        numeric[idx] = (load_loss(tf.constant(plus)).numpy()
                        - load_loss(tf.constant(minus)).numpy()) / (2 * h)
    assert np.abs(analytic).max() > 1e-3
    np.testing.assert_allclose(analytic, numeric, rtol=1e-4, atol=1e-7)


def test_zero_weights_and_evaluation_give_finite_values():
    clean = tf.zeros([4, 6])
    for noisy in (False, True):
        kwargs = {}
        if noisy:
            kwargs = dict(noise=tf.random.normal([4, 6]),
                          stddev=gating.noise_stddev(tf.zeros([4, 6])))
        result = gating.noisy_top_k_gating(clean, 2, **kwargs)
        for tensor in result:
            assert np.all(np.isfinite(tensor.numpy()))
    # k == n: every choice is always kept; the load estimator is not defined, the
    # indicator is used instead.
    result = gating.noisy_top_k_gating(clean, 6, noise=tf.ones([4, 6]),
                                       stddev=tf.ones([4, 6]))
    np.testing.assert_array_equal(result.load.numpy(), np.ones([4, 6]))


@pytest.mark.parametrize("noisy", [False, True])
def test_batch_sharded_gating_has_the_same_values_and_gradients(noisy):
    """The DTensor-friendly form (top-k indices only, values by one-hot contraction)."""
    rng = np.random.default_rng(7)
    logits = tf.constant(rng.normal(size=(6, 5)).astype(np.float32))
    noise = tf.constant(rng.normal(size=(6, 5)).astype(np.float32)) if noisy else None
    stddev = tf.constant(rng.uniform(0.5, 1.5, size=(6, 5)).astype(np.float32))
    upstream = [tf.constant(rng.normal(size=shape).astype(np.float32))
                for shape in ((6, 2), (6, 5))]

    def gate_and_load(batch_sharded):
        with tf.GradientTape(persistent=True) as tape:
            tape.watch([logits, stddev])
            result = gating.noisy_top_k_gating(
                logits, 2, noise=noise, stddev=stddev if noisy else None,
                batch_sharded=batch_sharded)
            objective = (tf.reduce_sum(result.gate * upstream[0])
                         + tf.reduce_sum(result.load * upstream[1]))
        grads = tape.gradient(objective, [logits, stddev])
        return [result.index, result.gate, result.load] + [
            g if g is not None else tf.zeros_like(logits) for g in grads]

    for plain, sharded in zip(gate_and_load(False), gate_and_load(True)):
        np.testing.assert_allclose(sharded.numpy(), plain.numpy(), rtol=1e-6, atol=1e-7)
