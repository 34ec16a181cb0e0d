"""The gate layers: shared checks of every gate, hierarchical Importance_H / Load_H,
balanced gating (the later routers' numerics: tests/test_router_gates.py)."""

import numpy as np
import pytest
import tensorflow as tf

from moe_tf import (ExpertChoiceGate, HierarchicalNoisyTopKGate, NoisyTopKGate,
                    StrictlyBalancedGate, SwitchGate, TopPGate)
from tests import numpy_reference as ref
from tests.layer_test_helper import run_layer_test


def fixed_noise(gate, seed):
    """Replaces the gate's noise source by reproducible samples the test can see."""
    rng = np.random.default_rng(seed)
    drawn = []

    def normal(shape):
        sample = rng.normal(size=tuple(int(s) for s in shape))
        drawn.append(sample)
        return tf.constant(sample, tf.float32)

    gate._normal = normal
    return drawn


def randomize(gate, seed=0):
    rng = np.random.default_rng(seed)
    for weight in gate.weights:
        weight.assign(rng.normal(size=weight.shape).astype(np.float32))


# Every gate: its kwargs, the expert slots per token of its routing, its trainable
# weights and the losses of its own one training call adds (the balanced gate's threshold
# loss, the Switch loss of switch and top_p).
@pytest.mark.parametrize("cls,kwargs,slots,weights,losses", [
    (NoisyTopKGate, dict(num_experts=4, k=2), 2, 2, 0),
    (NoisyTopKGate, dict(num_experts=4, k=2, bias_update_rate=0.01), 2, 2, 0),
    (HierarchicalNoisyTopKGate, dict(num_groups=2, experts_per_group=3, group_k=1, k=2),
     2, 4, 0),
    (StrictlyBalancedGate, dict(num_experts=4, k=2), 4, 2, 1),
    (SwitchGate, dict(num_experts=4, k=1), 1, 1, 1),
    (TopPGate, dict(num_experts=4, k=3, top_p_threshold=0.5), 3, 1, 1),
    (ExpertChoiceGate, dict(num_experts=4, k=2), 4, 1, 0),
])
def test_gates_shared_checks(cls, kwargs, slots, weights, losses):
    def gating_weights_are_float32(gate, data):
        assert gate.compute_dtype == "float32"

    # Gates return a GateOutput, not a tensor: no .keras or fit model around them.
    data = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
    run_layer_test(cls, init_kwargs=kwargs, input_data=data,
                   expected_output_shape=(5, slots), run_saving_test=False,
                   run_training_test=False, expected_num_trainable_weights=weights,
                   expected_num_losses=losses,
                   output_of=lambda output: output.routing.gate,
                   mixed_output_dtype="float32",
                   check_mixed_precision=gating_weights_are_float32)


def _noisy_top_k_numpy(clean, raw, noise, k):
    """(dense gates [T, n], smooth load per token [T, n]) in NumPy."""
    stddev = ref.softplus(raw) + 1e-2
    noisy = clean + noise * stddev
    gates = ref.top_k_gates(noisy, k)
    if k < clean.shape[-1]:
        probs = ref.normal_cdf((clean - ref.kth_excluding(noisy, k)) / stddev)
    else:
        probs = (gates > 0).astype(np.float64)
    return gates, probs


def test_flat_noisy_gate_matches_numpy():
    gate = NoisyTopKGate(num_experts=5, k=2)
    gate.build((None, 3))
    randomize(gate, 1)
    drawn = fixed_noise(gate, 2)
    x = np.random.default_rng(3).normal(size=(7, 3)).astype(np.float32)
    mask = np.array([1, 1, 0, 1, 1, 1, 0], bool)
    out = gate(x, training=True, token_mask=mask)
    x64 = x.astype(np.float64)
    gates, probs = _noisy_top_k_numpy(x64 @ np.asarray(gate.w_gate, np.float64),
                                      x64 @ np.asarray(gate.w_noise, np.float64),
                                      drawn[0], 2)
    gates[~mask] = 0
    np.testing.assert_allclose(out.routing.dense_gates().numpy(), gates, atol=1e-6)
    np.testing.assert_allclose(out.importance.numpy(), gates.sum(0), rtol=1e-5)
    np.testing.assert_allclose(out.load.numpy(), probs[mask].sum(0), rtol=1e-4)


def test_hierarchical_importance_and_load_match_numpy():
    a, b, group_k, k = 3, 4, 2, 2
    gate = HierarchicalNoisyTopKGate(num_groups=a, experts_per_group=b, group_k=group_k,
                                     k=k)
    gate.build((None, 3))
    randomize(gate, 4)
    drawn = fixed_noise(gate, 5)
    x = np.random.default_rng(6).normal(size=(9, 3)).astype(np.float32)
    mask = np.ones(9, bool)
    mask[4] = False
    out = gate(x, training=True, token_mask=mask)
    primary_noise, secondary_noise = drawn  # [T, a] and [T, group_k, b]

    x64 = x.astype(np.float64)
    w = {v.path.split("/")[-1]: np.asarray(v, np.float64) for v in gate.weights}
    primary_gates, primary_probs = _noisy_top_k_numpy(
        x64 @ w["w_gate"], x64 @ w["w_noise"], primary_noise, group_k)
    primary_gates[~mask] = 0
    importance = np.zeros((a, b))
    secondary_load = np.zeros((a, b))
    group_size = np.zeros(a)
    for t in np.nonzero(mask)[0]:
        groups = np.argsort(-(x64[t] @ w["w_gate"] + primary_noise[t]
                              * (ref.softplus(x64[t] @ w["w_noise"]) + 1e-2)),
                            kind="stable")[:group_k]
        for slot, i in enumerate(groups):
            gates, probs = _noisy_top_k_numpy(
                x64[t:t + 1] @ w["w_gate_secondary"][i],
                x64[t:t + 1] @ w["w_noise_secondary"][i],
                secondary_noise[t:t + 1, slot], k)
            importance[i] += primary_gates[t, i] * gates[0]
            secondary_load[i] += probs[0]
            group_size[i] += 1
    primary_load = primary_probs[mask].sum(0)
    load = primary_load[:, None] * secondary_load / np.maximum(group_size, 1)[:, None]

    np.testing.assert_allclose(out.importance.numpy(), importance.reshape(-1),
                               rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(out.load.numpy(), load.reshape(-1), rtol=1e-4, atol=1e-6)
    # The primary gate keeps a gradient through Load_H.
    with tf.GradientTape() as tape:
        load_h = gate(x, training=True).load
        loss = tf.reduce_sum(load_h * tf.range(a * b, dtype=tf.float32))
    grad = tape.gradient(loss, gate.w_gate)
    assert np.abs(grad.numpy()).max() > 0


def test_balanced_gate_trains_with_exactly_m_tokens_per_expert():
    gate = StrictlyBalancedGate(num_experts=4, k=2)
    gate.build((None, 3))
    randomize(gate, 7)
    x = np.random.default_rng(8).normal(size=(10, 3)).astype(np.float32)
    mask = np.ones(10, bool)
    mask[[2, 7]] = False
    out = gate(x, training=True, token_mask=mask)
    counts = out.routing.expert_counts().numpy()
    m = int(np.ceil(2 * 8 / 4))
    np.testing.assert_array_equal(counts, np.full(4, m))
    dense = out.routing.dense_gates().numpy()
    assert not dense[~mask].any()

    probs = ref.softmax(x.astype(np.float64) @ np.asarray(gate.w_gate, np.float64))
    batch_mask = np.zeros_like(probs)
    for e in range(4):
        valid = np.nonzero(mask)[0]
        batch_mask[valid[np.argsort(-probs[valid, e], kind="stable")[:m]], e] = 1
    kept = probs * batch_mask
    expected = kept / np.maximum(kept.sum(-1, keepdims=True), 1e-30)
    np.testing.assert_allclose(dense, expected, rtol=1e-5, atol=1e-7)

    # The threshold loss (Appendix F), averaged over the real tokens.
    threshold = np.asarray(gate.threshold, np.float64)
    loss = ((probs > threshold) - batch_mask) * (probs - threshold)
    np.testing.assert_allclose(gate.losses[0].numpy(), loss[mask].sum() / mask.sum(),
                               rtol=1e-5)


def test_balanced_threshold_loss_trains_only_the_threshold():
    gate = StrictlyBalancedGate(num_experts=4, k=1)
    gate.build((None, 3))
    randomize(gate, 9)
    x = tf.constant(np.random.default_rng(10).normal(size=(32, 3)).astype(np.float32))
    with tf.GradientTape() as tape:
        gate(x, training=True)
        loss = gate.losses[0]
    grad_gate, grad_threshold = tape.gradient(loss, [gate.w_gate, gate.threshold])
    assert grad_gate is None or not np.any(grad_gate.numpy())
    assert np.any(grad_threshold.numpy())

    # Gradient descent on the threshold alone makes inference match training routing.
    for _ in range(300):
        with tf.GradientTape() as tape:
            gate(x, training=True)
            loss = gate.losses[0]
        gate.threshold.assign_sub(0.05 * tape.gradient(loss, gate.threshold))
    train_routing = gate(x, training=True).routing.dense_gates().numpy() > 0
    infer_routing = gate(x, training=False).routing.dense_gates().numpy() > 0
    assert np.mean(train_routing == infer_routing) > 0.9
