"""The SparselyGatedMoE layer: shared layer checks, numerics against NumPy, API contract."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from moe_tf import FeedForwardExperts, SparselyGatedMoE
from tests import numpy_reference as ref
from tests.layer_test_helper import run_layer_test

CONFIGS = {
    "flat_sparse": dict(num_experts=4, k=2, hidden_size=8),
    "flat_capacity": dict(num_experts=4, k=2, hidden_size=8, dispatch="capacity",
                          capacity_factor=2.0),
    "capacity_groups": dict(num_experts=4, k=2, hidden_size=8, dispatch="capacity",
                            capacity_group_size=4),
    "hierarchical": dict(num_experts=8, k=2, hidden_size=8, num_groups=2, group_k=1),
    "balanced": dict(num_experts=4, k=2, hidden_size=8, gating="balanced"),
    "output_size": dict(num_experts=4, k=1, hidden_size=8, output_size=3),
}


def randomize(layer, seed=0, gate_scale=1.0):
    """Random gate and expert weights, so that routing is not decided by ties."""
    rng = np.random.default_rng(seed)
    for weight in layer.weights:
        scale = gate_scale if "/gate/" in weight.path else 0.5
        weight.assign(rng.normal(size=weight.shape).astype(np.float32) * scale)


def build(seed=0, input_dim=4, **kwargs):
    layer = SparselyGatedMoE(**kwargs)
    layer.build((None, input_dim))
    randomize(layer, seed)
    return layer


def expert_weights(layer):
    experts = layer.experts
    return [np.asarray(w, np.float64) for w in
            (experts.kernel_in, experts.bias_in, experts.kernel_out, experts.bias_out)]


def inputs(shape=(2, 3, 4), seed=1):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_shared_layer_checks(name):
    config = CONFIGS[name]
    x = inputs()

    def gating_is_float32(layer, data):
        assert layer.gate.compute_dtype == "float32"
        assert layer.gate_values(data).dtype == tf.float32

    gate_weights = {"hierarchical": 4, "balanced": 2}.get(name, 2)  # w_gate, w_noise...
    run_layer_test(SparselyGatedMoE, init_kwargs=config, input_data=x,
                   expected_output_shape=(2, 3, config.get("output_size", 4)),
                   expected_num_trainable_weights=gate_weights + 4,  # + the experts' 4
                   expected_num_non_trainable_weights=0,
                   # The balancing loss, and the balanced gate's threshold loss.
                   expected_num_losses=2 if name == "balanced" else 1,
                   float32_sublayers={"gate"}, check_mixed_precision=gating_is_float32)


def test_experts_shared_layer_checks():
    run_layer_test(FeedForwardExperts,
                   init_kwargs=dict(num_experts=3, hidden_size=5, output_size=2),
                   input_data=inputs((3, 4, 6)), expected_output_shape=(3, 4, 2),
                   expected_num_trainable_weights=4, expected_num_losses=0)


def test_experts_are_initialised_independently_at_dense_scale():
    experts = FeedForwardExperts(num_experts=64, hidden_size=256, output_size=128)
    experts.build((None, 128))
    kernel = np.asarray(experts.kernel_in)
    assert not np.allclose(kernel[0], kernel[1])
    # Glorot uniform for one [128, 256] kernel: variance 2 / (128 + 256).
    np.testing.assert_allclose(kernel.var(), 2.0 / (128 + 256), rtol=0.05)


@pytest.mark.parametrize("dispatch", ["sparse", "capacity"])
def test_flat_output_matches_numpy(dispatch):
    kwargs = dict(num_experts=5, k=2, hidden_size=6)
    if dispatch == "capacity":
        kwargs.update(dispatch="capacity", capacity_factor=5 / 2)  # room for every token
    layer = build(**kwargs)
    x = inputs((3, 4, 4))
    tokens = x.reshape(-1, 4).astype(np.float64)
    gates = ref.top_k_gates(tokens @ np.asarray(layer.w_gate, np.float64), 2)
    expected = ref.moe_output(tokens, gates, *expert_weights(layer)).reshape(3, 4, 4)
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(layer.gate_values(x).numpy().reshape(-1, 5), gates,
                               rtol=1e-5, atol=1e-7)


def hierarchical_gates(tokens, layer):
    """Dense G_H(x)_(i,j) = Gp(x)_i G_i(x)_j without noise, in NumPy."""
    gate = layer.gate
    primary = ref.top_k_gates(tokens @ np.asarray(gate.w_gate, np.float64),
                              gate.group_k)
    secondary_w = np.asarray(gate.w_gate_secondary, np.float64)
    dense = np.zeros((tokens.shape[0], layer.num_experts))
    b = gate.experts_per_group
    for i in range(gate.num_groups):
        secondary = ref.top_k_gates(tokens @ secondary_w[i], gate.k)
        dense[:, i * b:(i + 1) * b] = primary[:, i:i + 1] * secondary
    return dense


def test_hierarchical_output_matches_numpy():
    layer = build(num_experts=12, k=2, hidden_size=5, num_groups=3, group_k=2)
    x = inputs((5, 4))
    tokens = x.astype(np.float64)
    gates = hierarchical_gates(tokens, layer)
    assert np.all((gates > 0).sum(-1) == 4)
    np.testing.assert_allclose(layer.gate_values(x).numpy(), gates, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(layer(x).numpy(),
                               ref.moe_output(tokens, gates, *expert_weights(layer)),
                               rtol=1e-4, atol=1e-5)


def test_balanced_inference_uses_thresholds():
    layer = build(num_experts=4, k=2, hidden_size=5, gating="balanced")
    x = inputs((6, 4))
    probs = ref.softmax(x.astype(np.float64) @ np.asarray(layer.w_gate, np.float64))
    layer.gate.threshold.assign(np.full(4, 0.2, np.float32))
    kept = probs * (probs > 0.2)
    gates = kept / np.maximum(kept.sum(-1, keepdims=True), 1e-30)
    np.testing.assert_allclose(layer.gate_values(x).numpy(), gates, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(layer(x).numpy(),
                               ref.moe_output(x.astype(np.float64), gates,
                                              *expert_weights(layer)),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("config, group_size", [
    (dict(num_experts=6, k=2), None),
    (dict(num_experts=6, k=2), 6),   # 20 tokens: groups of 6, the last padded
    (dict(num_experts=8, k=2, num_groups=2, group_k=2), None),
    (dict(num_experts=4, k=2, gating="balanced"), None),
    (dict(num_experts=4, k=2, gating="balanced"), 6)])
def test_sparse_and_capacity_dispatch_agree_with_gradients(config, group_size):
    x = tf.constant(inputs((4, 5, 3)))
    layers = []
    for dispatch in ("sparse", "capacity"):
        extra = {"dispatch": "capacity", "capacity_factor": 8.0,
                 "capacity_group_size": group_size} if dispatch == "capacity" else {}
        # noisy_gating is top_k's setting (the balanced gate refuses it).
        noise = {} if config.get("gating") == "balanced" else {"noisy_gating": False}
        layers.append(build(input_dim=3, hidden_size=7, **noise, **config, **extra))
    results = []
    for layer in layers:
        with tf.GradientTape() as tape:
            y = layer(x, training=True)
            loss = tf.reduce_sum(tf.sin(y)) + tf.add_n(layer.losses)
        results.append((y, tape.gradient(loss, layer.trainable_weights)))
    (y_sparse, g_sparse), (y_capacity, g_capacity) = results
    np.testing.assert_allclose(y_sparse.numpy(), y_capacity.numpy(), rtol=1e-5, atol=1e-6)
    for a, b, weight in zip(g_sparse, g_capacity, layers[0].trainable_weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5,
                                   err_msg=weight.path)


def test_capacity_overflow_drops_later_tokens():
    # Zero gate weights: every token picks experts 0 and 1 (ties break to the lowest).
    layer = SparselyGatedMoE(4, 2, 5, dispatch="capacity", capacity_factor=1.0)
    layer.build((None, 3))
    x = inputs((8, 3))
    capacity = 4  # ceil(1.0 * 8 tokens * 2 / 4 experts)
    gates = np.zeros((8, 4))
    gates[:capacity, :2] = 0.5
    expected = ref.moe_output(x.astype(np.float64), gates, *expert_weights(layer))
    out = layer(x).numpy()
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out[capacity:], 0.0)


def capacity_gates(dense_gates, group_size, capacity, slot_major):
    """NumPy GShard capacity. In each group of `group_size` tokens an expert takes at
    most `capacity` assignments, earlier tokens first; with `slot_major` (top-k routing)
    every token's first choice comes before any token's second. Dropped assignments get
    gate 0."""
    kept = np.zeros_like(dense_gates)
    for start in range(0, len(dense_gates), group_size):
        group = dense_gates[start:start + group_size]
        ranked = np.argsort(-group, axis=1, kind="stable")   # choices, best first
        order = ([(rank, t) for rank in range(group.shape[1]) for t in range(len(group))]
                 if slot_major else
                 [(rank, t) for t in range(len(group)) for rank in range(group.shape[1])])
        used = np.zeros(group.shape[1], int)
        for rank, t in order:
            expert = ranked[t, rank]
            if group[t, expert] > 0 and used[expert] < capacity:
                used[expert] += 1
                kept[start + t, expert] = group[t, expert]
    return kept


@pytest.mark.parametrize("gating", ["top_k", "balanced"])
def test_capacity_groups_have_their_own_slots(gating):
    """With capacity_group_size, each group of tokens fills its own slots (the last group
    padded): outputs and drops as in NumPy, with capacity ceil(f * group * k / E)."""
    layer = build(num_experts=4, k=2, hidden_size=6, dispatch="capacity",
                  capacity_factor=1.0, capacity_group_size=4, gating=gating)
    x = inputs((11, 4))
    tokens = x.astype(np.float64)
    gates = layer.gate_values(x).numpy().astype(np.float64)
    kept = capacity_gates(gates, group_size=4, capacity=2,   # ceil(1.0 * 4 * 2 / 4)
                          slot_major=gating == "top_k")
    assert 0 < (kept > 0).sum() < (gates > 0).sum()          # some, not all, dropped
    np.testing.assert_allclose(layer(x).numpy(),
                               ref.moe_output(tokens, kept, *expert_weights(layer)),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("gating", ["top_k", "balanced"])
@pytest.mark.parametrize("group_size", [None, 4])
def test_capacity_dispatch_under_xla_matches_numpy_with_drops(gating, group_size):
    """dispatch="capacity" compiles with XLA: outputs equal the NumPy capacity reference
    (with drops) and the gradients equal the uncompiled layer's; the dropped fraction is
    the reference's. Widths of 16 and 32: where the compiled kernels are built the
    experts run as their XLA custom calls (tests/test_kernels.py checks that they do)."""
    layer = build(input_dim=16, num_experts=4, k=2, hidden_size=32, dispatch="capacity",
                  capacity_factor=1.0, capacity_group_size=group_size, gating=gating,
                  **({} if gating == "balanced" else {"noisy_gating": False}))
    x = tf.constant(inputs((11, 16)))
    gates = layer.gate_values(x).numpy().astype(np.float64)
    size = group_size or 11
    kept = capacity_gates(gates, group_size=size,
                          capacity=math.ceil(1.0 * size * 2 / 4),
                          slot_major=gating == "top_k")
    assert 0 < (kept > 0).sum() < (gates > 0).sum()          # some, not all, dropped

    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
            loss = tf.reduce_sum(y * y)
        return y, tape.gradient(loss, [x] + layer.experts.trainable_weights)

    compiled = tf.function(step, jit_compile=True)
    y, grads = compiled(x)
    assert layer.supports_jit
    # XLA compiles the whole step (its HLO exists; an op without an XLA kernel raises).
    assert "HloModule" in compiled.experimental_get_compiler_ir(x)(stage="hlo")
    if gating == "top_k":   # the balanced gate trains on the batchwise mask, not X > T
        np.testing.assert_allclose(
            y.numpy(), ref.moe_output(x.numpy().astype(np.float64), kept,
                                      *expert_weights(layer)), rtol=1e-4, atol=1e-5)
    layer.dropped_fraction_metric.reset_state()
    want_y, want_grads = step(x)
    np.testing.assert_allclose(y.numpy(), want_y.numpy(), rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-5)
    if gating == "top_k":
        want_dropped = 1 - (kept > 0).sum() / (gates > 0).sum()
        np.testing.assert_allclose(layer.balance_statistics()["dropped_fraction"],
                                   want_dropped, rtol=1e-6)


def test_capacity_layer_trains_in_model_fit_under_xla():
    tokens = keras.Input(shape=(6, 4))
    moe = SparselyGatedMoE(4, 2, 8, dispatch="capacity", capacity_factor=1.0, name="moe")
    model = keras.Model(tokens, moe(tokens))
    model.compile(optimizer="sgd", loss="mse", jit_compile=True)
    x = inputs((16, 6, 4))
    history = model.fit(x, x, epochs=2, batch_size=8, verbose=0)
    assert model.jit_compile  # Keras keeps XLA on: every layer supports it
    assert np.all(np.isfinite(history.history["loss"]))
    assert 0 <= history.history["moe_dropped_fraction"][-1] < 1
    # The sparse dispatch has dynamic shapes: Keras turns XLA off for it.
    sparse = keras.Model(tokens, SparselyGatedMoE(4, 2, 8)(tokens))
    sparse.compile(optimizer="sgd", loss="mse", jit_compile=True)
    sparse.fit(x, x, epochs=1, batch_size=8, verbose=0)
    assert not sparse.jit_compile


def test_sparse_dispatch_drops_nothing():
    layer = build(num_experts=4, k=2, hidden_size=6)
    layer(inputs((10, 4)), training=True)
    assert layer.balance_statistics()["dropped_fraction"].numpy() == 0.0


@pytest.mark.parametrize("storage", ["float32", "int8"])
def test_small_inference_calls_gather_weights_and_equal_large_ones(storage):
    # The default language model's layer: calls of up to 8 assignments (2 tokens) take
    # the gathered-weights path, larger ones the sorted rows.
    layer = SparselyGatedMoE(32, 4, 256, seed=0)
    layer.build((None, 128))
    for weight in layer.gate.weights:
        weight.assign(np.random.default_rng(1).normal(size=weight.shape) * 0.3)
    if storage != "float32":
        layer.quantize_experts(storage)
    assert layer.experts.per_assignment_limit == 8
    x = inputs((40, 128))
    batched = tf.function(lambda x: layer(x))
    large = batched(x).numpy()
    for size in (1, 2, 3):
        np.testing.assert_allclose(batched(x[:size]).numpy(), large[:size],
                                   rtol=1e-5, atol=1e-5)


def test_rank_2_3_4_inputs_route_every_position_alone():
    layer = build(num_experts=4, k=2, hidden_size=6)
    x = inputs((2, 3, 5, 4))
    flat = layer(x.reshape(-1, 4)).numpy()
    for shape in ((30, 4), (6, 5, 4), (2, 3, 5, 4)):
        out = layer(x.reshape(shape)).numpy()
        assert out.shape == shape
        np.testing.assert_allclose(out.reshape(-1, 4), flat, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dispatch", ["sparse", "capacity"])
def test_mask_skips_positions_everywhere(dispatch):
    layer = build(num_experts=4, k=2, hidden_size=6, dispatch=dispatch,
                  noisy_gating=False)
    x = inputs((2, 5, 4))
    mask = np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], bool)
    out = layer(x, mask=mask, training=True).numpy()
    np.testing.assert_array_equal(out[~mask], 0.0)
    np.testing.assert_allclose(out[mask], layer(x[mask]).numpy(), rtol=1e-6, atol=1e-7)
    # Only the 4 real tokens count: 4 tokens * k = 8 assignments.
    fraction = layer.balance_statistics()["load_fraction"].numpy()
    dense = ref.top_k_gates(x[mask].astype(np.float64) @ np.asarray(layer.w_gate), 2)
    np.testing.assert_allclose(fraction, (dense > 0).sum(0) / 8.0, rtol=1e-6)


@pytest.mark.parametrize("gating", ["top_k", "balanced", "top_p", "expert_choice"])
@pytest.mark.parametrize("dispatch", [
    dict(compiled_kernels="auto"), dict(compiled_kernels=False),
    dict(dispatch="capacity"), dict(dispatch="capacity", capacity_group_size=3)])
def test_batches_without_tokens_train(gating, dispatch):
    """An empty batch and a fully masked one give zero outputs, zero gradients for the
    inputs and experts, and a finite loss, on every dispatch and backward path."""
    layer = SparselyGatedMoE(6, 2, 16, gating=gating, **dispatch)
    layer.build((None, 16))
    for x, mask in ((tf.zeros([0, 16]), None), (tf.ones([5, 16]), tf.zeros([5], bool))):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True, mask=mask)
            loss = tf.reduce_sum(y) + tf.add_n([0.0, *layer.losses])
        grads = tape.gradient(loss, [x] + layer.experts.trainable_weights)
        assert y.shape == x.shape
        np.testing.assert_array_equal(y.numpy(), 0.0)
        assert np.isfinite(loss.numpy())
        for grad in grads:
            np.testing.assert_array_equal(grad.numpy(), 0.0)


def test_keras_mask_propagates_from_embedding():
    tokens = keras.Input(shape=(None,), dtype="int32")
    embedded = keras.layers.Embedding(10, 4, mask_zero=True)(tokens)
    moe = SparselyGatedMoE(4, 2, 6)
    model = keras.Model(tokens, moe(embedded))
    ids = np.array([[3, 4, 0, 0], [5, 0, 0, 0]])
    out = model(ids).numpy()
    np.testing.assert_array_equal(out[ids == 0], 0.0)
    assert np.any(out[ids != 0] != 0.0)


def test_balancing_loss_is_added_once_and_matches_numpy():
    layer = build(num_experts=4, k=2, hidden_size=6, noisy_gating=False,
                  importance_weight=0.3, load_weight=0.7)
    x = inputs((10, 4))
    layer(x)
    assert layer.losses == []  # inference adds nothing
    layer(x, training=True)
    assert len(layer.losses) == 1
    gates = ref.top_k_gates(x.astype(np.float64) @ np.asarray(layer.w_gate), 2)
    expected = (0.3 * ref.cv_squared(gates.sum(0))
                + 0.7 * ref.cv_squared((gates > 0).sum(0)))
    np.testing.assert_allclose(layer.losses[0].numpy(), expected, rtol=1e-5)
    layer(x, training=True)
    assert len(layer.losses) == 1  # a new call replaces, never accumulates

    stats = layer.balance_statistics()
    np.testing.assert_allclose(stats["cv_importance"], np.sqrt(ref.cv_squared(
        gates.sum(0))), rtol=1e-5)
    counts = (gates > 0).sum(0)
    np.testing.assert_allclose(stats["max_mean_load"], counts.max() / counts.mean(),
                               rtol=1e-6)


def test_zero_weights_add_no_loss():
    layer = SparselyGatedMoE(4, 2, 6, importance_weight=0.0, load_weight=0.0)
    layer(inputs(), training=True)
    assert layer.losses == []


def test_model_losses_and_metrics_reach_fit():
    x = keras.Input(shape=(3, 4))
    moe = SparselyGatedMoE(4, 2, 6, name="moe")
    model = keras.Model(x, moe(x))
    model.compile(optimizer="adam", loss="mse")
    history = model.fit(inputs((8, 3, 4)), inputs((8, 3, 4), seed=2), epochs=2,
                        batch_size=4, verbose=0)
    for key in ("loss", "moe_cv_importance", "moe_cv_load", "moe_max_mean_load"):
        assert key in history.history, history.history.keys()
    assert len(model.losses) == 1
    assert moe.balance_statistics()["load_fraction"].shape == (4,)


@pytest.mark.parametrize("k", [1, 2])
def test_gate_weights_get_gradients(k):
    layer = SparselyGatedMoE(6, k, 8, seed=3)  # zero-initialised gates, as in the paper
    x = tf.constant(inputs((16, 4)))
    with tf.GradientTape() as tape:
        y = layer(x, training=True)
        loss = tf.reduce_sum(tf.square(y)) + tf.add_n(layer.losses)
    grads = dict(zip([w.path for w in layer.trainable_weights],
                     tape.gradient(loss, layer.trainable_weights)))
    for name in ("gate/w_gate", "gate/w_noise"):
        grad = next(g for path, g in grads.items() if path.endswith(name))
        assert grad is not None and np.abs(grad.numpy()).max() > 0, name
    for grad in grads.values():
        assert np.all(np.isfinite(grad.numpy()))


def test_evaluation_with_zero_gates_is_finite_and_noise_free():
    layer = SparselyGatedMoE(6, 2, 8)
    x = inputs((16, 4))
    first, second = layer(x).numpy(), layer(x).numpy()
    np.testing.assert_array_equal(first, second)
    assert np.all(np.isfinite(first))
    assert np.all(np.isfinite(layer.gate_values(x).numpy()))


def test_unselected_expert_does_not_change_the_output():
    layer = build(num_experts=6, k=2, hidden_size=5)
    x = inputs((3, 4))
    gates = layer.gate_values(x).numpy()
    unused = [e for e in range(6) if not gates[:, e].any()]
    used = [e for e in range(6) if gates[:, e].any()]
    assert unused, "the test needs an expert no token selects"
    before = layer(x).numpy()
    for e, should_change in ((unused[0], False), (used[0], True)):
        kernel = np.asarray(layer.experts.kernel_in).copy()
        kernel[e] += 1.0
        layer.experts.kernel_in.assign(kernel)
        after = layer(x).numpy()
        assert np.any(after != before) == should_change, e
        before = after


def test_thousands_of_tiny_experts():
    x = tf.constant(inputs((64, 4)))
    for kwargs in (dict(num_experts=4096, k=2), dict(num_experts=4096, k=2,
                                                     num_groups=64)):
        layer = SparselyGatedMoE(hidden_size=2, seed=0, **kwargs)

        @tf.function
        def step(x):
            with tf.GradientTape() as tape:
                y = layer(x, training=True)
                loss = tf.reduce_sum(y) + tf.add_n([0.0, *layer.losses])
            return y, tape.gradient(loss, layer.trainable_weights)

        y, grads = step(x)
        assert y.shape == (64, 4)
        assert all(np.all(np.isfinite(g.numpy())) for g in grads)


def test_mixed_precision_global_policy_keeps_gating_in_float32(global_dtype_policy):
    global_dtype_policy("mixed_bfloat16")
    layer = SparselyGatedMoE(4, 2, 8)
    x = inputs((2, 3, 4))
    y = layer(x, training=True)
    assert y.dtype == tf.bfloat16
    assert layer.gate.w_gate.dtype == "float32"
    assert layer.gate_values(x).dtype == tf.float32
    assert layer.losses[0].dtype == tf.float32


CONSTRUCTOR_ERRORS = [
    (dict(num_experts=4, k=0, hidden_size=3), "`k`"),
    (dict(num_experts=4, k=5, hidden_size=3), "`k`"),
    (dict(num_experts=0, k=1, hidden_size=3), "`num_experts`"),
    (dict(num_experts=4, k=1, hidden_size=0), "`hidden_size`"),
    (dict(num_experts=4, k=1, hidden_size=3, output_size=-1), "`output_size`"),
    (dict(num_experts=6, k=1, hidden_size=3, num_groups=4), "divisible by `num_groups`"),
    (dict(num_experts=8, k=3, hidden_size=3, num_groups=4), "experts per group"),
    (dict(num_experts=8, k=2, hidden_size=3, num_groups=4, group_k=5), "`group_k`"),
    (dict(num_experts=8, k=2, hidden_size=3, group_k=1), "`group_k`"),
    (dict(num_experts=8, k=2, hidden_size=3, dispatch="dense"), "`dispatch`"),
    (dict(num_experts=8, k=2, hidden_size=3, gating="hash"), "`gating`"),
    (dict(num_experts=8, k=2, hidden_size=3, capacity_factor=1.0), "`capacity_factor`"),
    (dict(num_experts=8, k=2, hidden_size=3, dispatch="capacity", capacity_factor=0),
     "`capacity_factor`"),
    (dict(num_experts=8, k=2, hidden_size=3, capacity_group_size=4),
     "`capacity_group_size`"),
    (dict(num_experts=8, k=2, hidden_size=3, dispatch="capacity", capacity_group_size=0),
     "`capacity_group_size`"),
    (dict(num_experts=8, k=2, hidden_size=3, importance_weight=-1), "`importance_weight`"),
    (dict(num_experts=8, k=2, hidden_size=3, load_weight=-0.1), "`load_weight`"),
    (dict(num_experts=8, k=2, hidden_size=3, noise_epsilon=0.0), "`noise_epsilon`"),
    (dict(num_experts=8, k=2, hidden_size=3, gating="balanced", num_groups=2),
     "`num_groups`"),
]


@pytest.mark.parametrize("kwargs,message", CONSTRUCTOR_ERRORS)
def test_constructor_errors_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SparselyGatedMoE(**kwargs)


def test_input_errors_name_the_problem():
    layer = SparselyGatedMoE(4, 2, 3)
    with pytest.raises(ValueError, match="floating-point"):
        layer(np.ones((2, 4), np.int32))
    with pytest.raises(ValueError, match="last dimension"):
        SparselyGatedMoE(4, 2, 3).build((2, None))
    with pytest.raises(ValueError, match="rank >= 2"):
        SparselyGatedMoE(4, 2, 3).build((4,))
    with pytest.raises(ValueError, match="`mask`"):
        layer(inputs((2, 3, 4)), mask=np.ones((2, 4), bool))


def test_a_call_of_another_width_than_the_build_names_the_axis():
    layer = SparselyGatedMoE(4, 2, 3, name="moe")
    layer(inputs((2, 5)))
    with pytest.raises(ValueError, match=r"layer 'moe'.*axis -1.*value 5.*\(2, 6\)"):
        layer(inputs((2, 6)))
    with pytest.raises(ValueError, match=r"layer 'experts'.*axis -1.*value 5"):
        layer.experts(inputs((4, 6)))
    layer(inputs((3, 2, 5)))  # any leading shape of the same width still runs


def test_balanced_training_fits_capacity_factor_one_exactly():
    """Every expert takes exactly m = k T / n tokens, so capacity 1.0 drops nothing."""
    x = inputs((16, 3))
    outputs = []
    for extra in ({}, {"dispatch": "capacity", "capacity_factor": 1.0}):
        layer = build(input_dim=3, num_experts=4, k=2, hidden_size=5, gating="balanced",
                      **extra)
        outputs.append(layer(x, training=True).numpy())
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-6)


def test_shard_experts_names_what_it_needs():
    from tensorflow.experimental import dtensor

    from moe_tf import ExpertSharding

    mesh = dtensor.create_mesh([("batch", 1), ("expert", 1)], devices=["CPU:0"],
                               device_type="CPU")
    sharding = ExpertSharding(mesh)
    with pytest.raises(ValueError, match="needs dispatch='capacity'"):
        SparselyGatedMoE(4, 2, 8).shard_experts(sharding)
    with pytest.raises(ValueError, match="no 'model' axis"):
        ExpertSharding(mesh, expert_axis="model")
    layer = SparselyGatedMoE(4, 2, 8, dispatch="capacity")
    layer.shard_experts(sharding)
    assert layer.gate.batch_sharded and layer.expert_sharding is sharding
    layer.shard_experts(None)
    assert not layer.gate.batch_sharded and layer.expert_sharding is None
    # A runtime placement, not configuration.
    assert "expert_sharding" not in layer.get_config()
