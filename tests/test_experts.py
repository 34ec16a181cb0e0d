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


def _bfloat16_rounded(values):
    return tf.cast(tf.cast(values, tf.bfloat16), tf.float64).numpy()


@pytest.mark.parametrize("storage", ["bfloat16", "int8"])
def test_quantized_kernels_compute_with_the_dequantised_weights(storage):
    """int8: round(w / s) with s = max |w| / 127 per expert and output channel; bfloat16:
    w rounded to bfloat16. Both paths (sorted rows, batched buffers) then compute exactly
    what NumPy computes with the dequantised weights; biases stay float32."""
    rng = np.random.default_rng(3)
    layer = FeedForwardExperts(num_experts=3, hidden_size=6, output_size=4)
    layer.build((None, 5))
    for weight in layer.weights:
        weight.assign(rng.normal(size=weight.shape).astype(np.float32))
    floats = {name: np.asarray(getattr(layer, name), np.float64)
              for name in ("kernel_in", "bias_in", "kernel_out", "bias_out")}
    layer.quantize_kernels(storage)
    assert not layer.trainable_weights[0].path.endswith("kernel_in")
    assert {w.path.split("/")[-1]: w.dtype for w in layer.weights}["kernel_in"] == storage
    dequantised = dict(floats)
    for name in ("kernel_in", "kernel_out"):
        if storage == "int8":
            scale = np.abs(floats[name]).max(axis=1, keepdims=True) / 127.0
            np.testing.assert_allclose(getattr(layer, f"{name}_scale").numpy(), scale,
                                       rtol=1e-6)
            quantized = np.clip(np.round(floats[name] / scale), -127, 127)
            np.testing.assert_array_equal(getattr(layer, name).numpy(), quantized)
            dequantised[name] = quantized * scale
            assert np.abs(dequantised[name] - floats[name]).max() <= scale.max() / 2 + 1e-6
        else:
            dequantised[name] = _bfloat16_rounded(floats[name])
    rows = rng.normal(size=(7, 5)).astype(np.float32)
    counts = [3, 0, 4]
    expert_of_row = np.repeat(np.arange(3), counts)
    want = np.stack([ref.expert_ffn(rows[r], dequantised["kernel_in"][e],
                                    dequantised["bias_in"][e], dequantised["kernel_out"][e],
                                    dequantised["bias_out"][e])
                     for r, e in enumerate(expert_of_row)])
    got = layer(rows, expert_row_counts=tf.constant(counts))
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)
    buffers = rng.normal(size=(3, 2, 5)).astype(np.float32)
    want = np.stack([[ref.expert_ffn(buffers[e, c], dequantised["kernel_in"][e],
                                     dequantised["bias_in"][e], dequantised["kernel_out"][e],
                                     dequantised["bias_out"][e]) for c in range(2)]
                     for e in range(3)])
    np.testing.assert_allclose(layer(buffers).numpy(), want, rtol=1e-5, atol=1e-5)
    assert FeedForwardExperts.from_config(layer.get_config()).kernel_storage == storage
    with pytest.raises(ValueError, match="only built float32 kernels"):
        layer.quantize_kernels("int8")


def test_kernel_storage_is_checked():
    with pytest.raises(ValueError, match="`kernel_storage` must be one of"):
        FeedForwardExperts(num_experts=2, hidden_size=4, output_size=4,
                           kernel_storage="int4")
    layer = FeedForwardExperts(num_experts=2, hidden_size=4, output_size=4)
    layer.build((None, 4))
    with pytest.raises(ValueError, match="`storage` must be one of"):
        layer.quantize_kernels("float16")


def _sorted_rows_reference(rows, expert_row_counts, weights, **expert):
    """Each expert of any kind (`ref.gated_expert_ffn`) on its block of sorted rows;
    padding rows after the last block output zeros."""
    outputs = np.zeros((rows.shape[0], weights[2].shape[-1]))
    begin = 0
    for e, size in enumerate(expert_row_counts):
        outputs[begin:begin + size] = ref.gated_expert_ffn(
            rows[begin:begin + size], *(w[e] for w in weights), **expert)
        begin += size
    return outputs


@pytest.mark.parametrize("activation, gated", [
    ("silu", "glu"), ("gelu", "glu"), ("relu", "gpt_oss"), ("silu", None)])
@pytest.mark.parametrize("use_bias", [True, False])
def test_other_experts_on_sorted_rows_and_buffers_match_numpy(activation, gated, use_bias):
    """Gated (SwiGLU, GeGLU, GPT-OSS) and non-ReLU experts, with and without biases:
    outputs against NumPy on both paths, gradients against NumPy's central differences."""
    rng = np.random.default_rng(3)
    expert_row_counts, d_in, hidden, d_out = [3, 0, 4, 2], 3, 2, 2
    num_rows = sum(expert_row_counts) + 2  # two padding rows
    layer = FeedForwardExperts(num_experts=4, hidden_size=hidden, output_size=d_out,
                               activation=activation, gated=gated, use_bias=use_bias)
    layer.build((None, d_in))
    in_width = hidden * (2 if gated else 1)
    assert layer.kernel_in.shape == (4, d_in, in_width)
    assert len(layer.weights) == (4 if use_bias else 2)
    # GPT-OSS's clamps at 7 must be reached by some pre-activations.
    scale = 4.0 if gated == "gpt_oss" else 1.0
    for weight in layer.weights:
        weight.assign(rng.normal(size=weight.shape) * scale)
    values = [w.numpy().astype(np.float64) for w in layer.weights]
    if not use_bias:  # the reference's biases: zeros
        values = [values[0], np.zeros((4, in_width)), values[1], np.zeros((4, d_out))]
    rows = rng.normal(size=(num_rows, d_in))
    d_outputs = rng.normal(size=(num_rows, d_out))
    expert = dict(activation=activation, gated=gated)

    x = tf.constant(rows, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, expert_row_counts=tf.constant(expert_row_counts, tf.int32))
        loss = tf.reduce_sum(y * tf.constant(d_outputs, tf.float32))
    grads = tape.gradient(loss, [x] + layer.weights)

    def reference_loss():
        return np.sum(_sorted_rows_reference(rows, expert_row_counts, values, **expert)
                      * d_outputs)

    np.testing.assert_allclose(
        y.numpy(), _sorted_rows_reference(rows, expert_row_counts, values, **expert),
        rtol=1e-5, atol=1e-5)
    wanted = [rows] + ([values[0], values[1], values[2], values[3]] if use_bias
                       else [values[0], values[2]])
    for got, value in zip(grads, wanted):
        np.testing.assert_allclose(got.numpy(), ref.numerical_gradient(reference_loss, value),
                                   rtol=1e-3, atol=1e-4)

    # The batched (capacity) path: buffers [experts, capacity, d_in].
    buffers = rng.normal(size=(4, 3, d_in))
    want = np.stack([ref.gated_expert_ffn(buffers[e], *(w[e] for w in values), **expert)
                     for e in range(4)])
    np.testing.assert_allclose(layer(tf.constant(buffers, tf.float32)).numpy(), want,
                               rtol=1e-5, atol=1e-5)


def test_gated_experts_refuse_what_they_cannot_do():
    with pytest.raises(ValueError, match="`gated` must be None or one of"):
        FeedForwardExperts(num_experts=2, hidden_size=4, output_size=2, gated="swish")
    with pytest.raises(ValueError, match="run only the paper's ReLU experts"):
        FeedForwardExperts(num_experts=2, hidden_size=4, output_size=2, gated="glu",
                           compiled_kernels=True)
