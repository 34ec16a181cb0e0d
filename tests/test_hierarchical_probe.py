"""benchmarks.hierarchical_probe: routing statistics, margins and gradients on small exact inputs."""

import numpy as np
import pytest

from benchmarks import hierarchical_probe as probe
from moe_tf.gates import HierarchicalNoisyTopKGate, NoisyTopKGate


def test_flat_routing_statistics():
    gates = np.array([[0.5, 0.5, 0.0], [0.8, 0.0, 0.2]])
    stats = probe.routing_statistics(gates)["experts"]
    # Counts [2, 1, 1]: mean 4/3, population std sqrt(2/9).
    assert stats["unused"] == 0.0
    assert stats["effective"] == pytest.approx(np.exp(0.5 * np.log(2) + 0.5 * np.log(4)) / 3)
    assert stats["cv"] == pytest.approx(np.sqrt(2 / 9) / (4 / 3))
    assert stats["max_mean"] == pytest.approx(1.5)
    assert stats["busiest_tenth_share"] == pytest.approx(0.5)
    assert stats["top_gate"] == pytest.approx(0.65)


def test_hierarchical_routing_statistics():
    # 2 groups of 2 experts, one group per position.
    gates = np.array([[0.6, 0.4, 0.0, 0.0],
                      [0.5, 0.5, 0.0, 0.0],
                      [0.0, 0.0, 1.0, 0.0],
                      [0.7, 0.3, 0.0, 0.0]])
    stats = probe.routing_statistics(gates, num_groups=2)
    # Expert counts [3, 3, 1, 0]; group counts [3, 1]; inside: [3, 3] and [1, 0].
    assert stats["experts"]["unused"] == 0.25
    shares = np.array([3, 3, 1]) / 7
    assert stats["experts"]["effective"] == pytest.approx(
        np.exp(-np.sum(shares * np.log(shares))) / 4)
    assert stats["experts"]["cv"] == pytest.approx(np.sqrt(1.6875) / 1.75)
    assert stats["experts"]["top_gate"] == pytest.approx(0.7)
    assert stats["groups"]["cv"] == pytest.approx(0.5)
    assert stats["groups"]["max_mean"] == pytest.approx(1.5)
    assert stats["groups"]["top_gate"] == pytest.approx(1.0)
    assert stats["within_groups"]["cv"] == pytest.approx(0.5)


def test_margin_over_noise():
    clean = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 1.5]])
    noise = np.array([[1.0, 1.0, 2.0], [0.5, 0.5, 0.5]])
    # k = 1: (3 - 1) / (4/3) and (2 - 1.5) / 0.5.
    assert probe._margin_over_noise(clean, noise, 1) == pytest.approx((1.5 + 1.0) / 2)
    assert probe._margin_over_noise(clean, None, 1) is None
    assert probe._margin_over_noise(clean, noise, 3) is None


def _random_weights(gate, rng):
    for weight in gate.trainable_weights:
        weight.assign(rng.normal(size=weight.shape).astype(np.float32))


def test_hierarchical_level_margins_match_a_loop():
    rng = np.random.default_rng(0)
    gate = HierarchicalNoisyTopKGate(num_groups=3, experts_per_group=4, group_k=1, k=2,
                                     seed=0)
    gate.build((None, 5))
    _random_weights(gate, rng)
    inputs = rng.normal(size=(7, 5)).astype(np.float32)
    margins = probe.level_margins(gate, inputs)

    def softplus(x):
        return np.log1p(np.exp(x)) + gate.noise_epsilon

    w, wn = gate.w_gate.numpy(), gate.w_noise.numpy()
    ws, wns = gate.w_gate_secondary.numpy(), gate.w_noise_secondary.numpy()
    primary, secondary = [], []
    for x in inputs:
        logits = np.sort(x @ w)[::-1]
        primary.append((logits[0] - logits[1]) / softplus(x @ wn).mean())
        group = np.argmax(x @ w)
        inner = np.sort(x @ ws[group])[::-1]
        secondary.append((inner[1] - inner[2]) / softplus(x @ wns[group]).mean())
    assert margins["groups"] == pytest.approx(np.mean(primary), rel=1e-5)
    assert margins["experts"] == pytest.approx(np.mean(secondary), rel=1e-5)


def test_balancing_gradients_reach_every_weight_of_both_levels():
    rng = np.random.default_rng(1)
    inputs = rng.normal(size=(64, 3)).astype(np.float32)
    gate = HierarchicalNoisyTopKGate(num_groups=2, experts_per_group=4, group_k=1, k=2,
                                     seed=0)
    gate.build((None, 3))
    _random_weights(gate, rng)
    result = probe.balancing_gradients(gate, inputs)
    names = {"w_gate", "w_noise", "w_gate_secondary", "w_noise_secondary"}
    assert set(result["load"]) == names and all(v > 0 for v in result["load"].values())
    assert set(result["importance"]) >= {"w_gate", "w_gate_secondary"}
    assert result["secondary_groups_reached"] == 1.0

    flat = NoisyTopKGate(num_experts=4, k=2, seed=0)
    flat.build((None, 3))
    _random_weights(flat, rng)
    result = probe.balancing_gradients(flat, inputs)
    assert set(result["load"]) == {"w_gate", "w_noise"}
    assert "secondary_groups_reached" not in result


def test_noisy_routing_applies_the_training_noise_only_inside_the_block():
    rng = np.random.default_rng(3)
    gate = NoisyTopKGate(num_experts=8, k=2, seed=0)
    gate.build((None, 3))
    _random_weights(gate, rng)
    inputs = rng.normal(size=(32, 3)).astype(np.float32)

    def served_experts():
        return gate(inputs, training=False).routing.expert_index.numpy()

    before = served_experts()
    with probe.noisy_routing(gate):
        noisy = served_experts()
    np.testing.assert_array_equal(served_experts(), before)
    assert (noisy != before).any()
