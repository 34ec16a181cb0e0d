"""The experts on rows sorted by expert (the sparse path's FFNs) against NumPy, on both
backward passes: the loop over experts and the batched pass over padded blocks."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from moe_tf import FeedForwardExperts
from moe_tf import experts as experts_module
from tests import numpy_reference as ref


@pytest.mark.parametrize("expert_row_counts, padded", [
    ([3, 0, 5, 1, 2, 4], True),   # small blocks: padding at most doubles the rows
    ([14, 0, 1, 0, 0, 0], False),  # skewed: padding to 14 rows would make 84 of 15
    ([130, 3], False),             # a block of _SMALL_BLOCK_ROWS or more
    ([0, 0, 0], True),             # no rows at all (every token masked)
    # 65 small blocks, two of them past the first pass's capacity of 12: an overflow pass
    ([10] * 60 + [12, 15, 20, 11, 0], True),
])
@pytest.mark.parametrize("recompute", [False, True])
def test_sorted_rows_outputs_and_gradients_match_numpy(expert_row_counts, padded,
                                                       recompute):
    rng = np.random.default_rng(0)
    num_experts, d_in, hidden, d_out = len(expert_row_counts), 5, 7, 4
    num_rows = sum(expert_row_counts) + 2  # two padding rows after the last expert's
    layer = FeedForwardExperts(num_experts=num_experts, hidden_size=hidden,
                               output_size=d_out, recompute_activations=recompute)
    layer.build((None, d_in))
    for weight in layer.weights:
        weight.assign(rng.normal(size=weight.shape))
    rows = rng.normal(size=(num_rows, d_in))
    d_outputs = rng.normal(size=(num_rows, d_out))
    sizes = tf.constant(expert_row_counts, tf.int32)
    assert bool(experts_module._pad_to_batch(sizes, num_rows)) is padded
    assert not experts_module._pad_to_batch(sizes, 0)  # an empty batch: the loop

    x = tf.constant(rows, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, expert_row_counts=sizes)
        loss = tf.reduce_sum(y * tf.constant(d_outputs, tf.float32))
    grads = tape.gradient(loss, [x] + layer.weights)

    want_y, want_grads = ref.sorted_rows_ffn_and_gradients(
        rows, expert_row_counts, d_outputs, *(w.numpy().astype(np.float64)
                                       for w in layer.weights))
    np.testing.assert_allclose(y.numpy(), want_y, rtol=1e-5, atol=1e-5)
    for got, want, name in zip(grads, want_grads, ["rows"] + [w.name for w in layer.weights]):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("seed", range(5))
def test_split_capacity_minimises_the_padded_cost(seed):
    rng = np.random.default_rng(seed)
    sizes = rng.poisson(rng.uniform(1, 40), size=rng.integers(2, 300))
    capacity, overflow = (int(v) for v in experts_module._split_capacity(
        tf.constant(sizes, tf.int32)))
    largest = sizes.max()

    def cost(c):
        return (len(sizes) * c + np.sum(sizes > c)
                * (experts_module._OVERFLOW_EXPERT_ROWS + largest - c))

    assert 1 <= capacity <= max(largest, 1)
    assert overflow == max(largest - capacity, 0)
    assert cost(capacity) == min(cost(c) for c in range(1, max(largest, 1) + 1))


def test_split_capacity_overflow_pass_is_used_when_one_block_sticks_out():
    sizes = tf.constant([10] * 60 + [12, 15, 20, 11, 0], tf.int32)
    capacity, overflow = experts_module._split_capacity(sizes)
    assert (int(capacity), int(overflow)) == (12, 8)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_two_pass_padded_backward_in_half_precision_matches_float32(dtype):
    # The overflow pass adds weight gradients in place and writes rows over the first
    # pass's: both must work in the mixed-precision compute dtypes too.
    expert_row_counts = [10] * 60 + [12, 15, 20, 11, 0]
    rng = np.random.default_rng(1)
    num_rows = sum(expert_row_counts)
    weights = None
    results = {}
    for compute in ("float32", dtype):
        layer = FeedForwardExperts(num_experts=len(expert_row_counts), hidden_size=6,
                                   output_size=3, dtype=keras.DTypePolicy(f"mixed_{compute}")
                                   if compute != "float32" else "float32")
        layer.build((None, 4))
        if weights is None:
            weights = [rng.normal(size=w.shape) * 0.5 for w in layer.weights]
            # Pre-activations far above 0: rounding must not flip which units are on.
            weights[1] += 5.0
            rows = rng.normal(size=(num_rows, 4))
            d_outputs = rng.normal(size=(num_rows, 3))
        for weight, value in zip(layer.weights, weights):
            weight.assign(value)
        x = tf.constant(rows, compute)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, expert_row_counts=tf.constant(expert_row_counts, tf.int32))
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * d_outputs.astype(np.float32))
        results[compute] = [tf.cast(g, tf.float32).numpy()
                            for g in tape.gradient(loss, [x] + layer.weights)]
    for got, want in zip(results[dtype], results["float32"]):
        # Half precision keeps 8 (bfloat16) or 11 (float16) significant bits: compare
        # against the scale of each gradient, not element by element.
        assert np.abs(got - want).max() <= 0.03 * np.abs(want).max()
