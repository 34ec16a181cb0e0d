"""The later routers against NumPy: Switch, top-p, expert choice, the aux-loss-free bias
and the router z-loss; each inside the layer with both dispatches."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from moe_tf import (ExpertChoiceGate, HierarchicalNoisyTopKGate, MoEConfig, NoisyTopKGate,
                    SoftmaxTopKGate, SparselyGatedMoE, SwitchGate, TopPGate)
from tests import numpy_reference as ref
from tests.layer_test_helper import run_layer_test
from tests.test_gates import randomize


def _tokens(shape=(9, 3), seed=3):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _probs(gate, x):
    return ref.softmax(x.astype(np.float64) @ np.asarray(gate.w_gate, np.float64))


def _switch_loss(probs, dense_gates, mask):
    counts = (dense_gates[mask] > 0).sum(0)
    return probs.shape[1] * np.sum(counts / counts.sum() * probs[mask].mean(0))


def _z_loss(logits, mask):
    log_z = np.log(np.exp(logits).sum(-1))
    return np.mean(log_z[mask] ** 2)


def test_switch_routes_top_1_with_its_loss_and_z_terms():
    gate = SwitchGate(num_experts=5, k=1, switch_loss_weight=0.5)
    gate.build((None, 3))
    randomize(gate, 1)
    x = _tokens()
    mask = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1], bool)
    out = gate(x, training=True, token_mask=mask)
    probs = _probs(gate, x)
    want = np.zeros_like(probs)
    want[np.arange(9), probs.argmax(1)] = probs.max(1)
    want[~mask] = 0
    np.testing.assert_allclose(out.routing.dense_gates().numpy(), want, rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_allclose(out.load.numpy(), (want > 0).sum(0))
    (switch_loss,) = gate.losses
    np.testing.assert_allclose(switch_loss.numpy(), 0.5 * _switch_loss(probs, want, mask),
                               rtol=1e-5)
    logits = x.astype(np.float64) @ np.asarray(gate.w_gate, np.float64)
    np.testing.assert_allclose(out.router_z.numpy(),
                               np.log(np.exp(logits).sum(-1)) ** 2 * mask, rtol=1e-5)
    # The Switch loss pulls on the router (through P), the counts have no gradient.
    with tf.GradientTape() as tape:
        gate(x, training=True)
        loss = gate.losses[-1]
    assert np.abs(tape.gradient(loss, gate.w_gate).numpy()).max() > 0


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("router_bias", [True, False])
def test_softmax_top_k_routes_as_mixtral_qwen_and_gpt_oss(normalize, router_bias):
    gate = SoftmaxTopKGate(num_experts=5, k=2, switch_loss_weight=0.02,
                           normalize_top_k=normalize, router_bias=router_bias)
    gate.build((None, 3))
    randomize(gate, 4)
    if router_bias:
        gate.b_gate.assign(np.linspace(-1.0, 1.0, 5))
    x = _tokens()
    mask = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1], bool)
    out = gate(x, training=True, token_mask=mask)
    logits = x.astype(np.float64) @ np.asarray(gate.w_gate, np.float64)
    if router_bias:
        logits += np.linspace(-1.0, 1.0, 5)
    probs = ref.softmax(logits)
    want = np.zeros_like(probs)
    for t, row in enumerate(probs):
        top = np.argsort(-row, kind="stable")[:2]
        want[t, top] = row[top] / (row[top].sum() if normalize else 1.0)
    want[~mask] = 0
    np.testing.assert_allclose(out.routing.dense_gates().numpy(), want, rtol=1e-5,
                               atol=1e-7)
    if normalize:  # GPT-OSS's form: the softmax of the two largest logits
        top_logits = np.sort(logits, axis=-1)[:, -2:]
        np.testing.assert_allclose(np.sort(want, axis=-1)[mask, -2:],
                                   ref.softmax(top_logits)[mask], rtol=1e-5)
    (loss,) = gate.losses
    np.testing.assert_allclose(loss.numpy(), 0.02 * _switch_loss(probs, want, mask),
                               rtol=1e-5)
    assert len(gate.trainable_weights) == 1 + router_bias


@pytest.mark.parametrize("gating", ["top_k", "balanced", "switch", "expert_choice"])
def test_layer_adds_the_router_z_loss_of_the_real_tokens(gating):
    layer = SparselyGatedMoE(4, 1, 4, gating=gating, router_z_loss_weight=0.3,
                             importance_weight=0.0, load_weight=0.0,
                             **({"noisy_gating": False} if gating == "top_k" else {}))
    layer.build((None, 3))
    randomize(layer.gate, 9)
    x = _tokens()
    mask = np.array([1, 1, 0, 1, 1, 1, 0, 1, 1], bool)
    layer(x, training=True, mask=mask)
    z_losses = list(layer.losses)
    logits = x.astype(np.float64) @ np.asarray(layer.gate.w_gate, np.float64)
    want = 0.3 * _z_loss(logits, mask)
    assert any(np.isclose(loss.numpy(), want, rtol=1e-5) for loss in z_losses), (
        [loss.numpy() for loss in z_losses], want)


def test_top_p_takes_experts_until_their_mass_reaches_p():
    gate = TopPGate(num_experts=6, k=3, top_p_threshold=0.5)
    gate.build((None, 3))
    randomize(gate, 2)
    gate.w_gate.assign(gate.w_gate * 2.0)  # some tokens sure, some not
    x = _tokens((12, 3))
    out = gate(x, training=False)
    probs = _probs(gate, x)
    want = np.zeros_like(probs)
    for t, row in enumerate(probs):
        mass = 0.0
        for e in np.argsort(-row, kind="stable")[:3]:
            if mass >= 0.5:
                break
            want[t, e], mass = row[e], mass + row[e]
    taken = (want > 0).sum(1)
    assert set(taken) >= {1, 2}, taken   # k varies by token
    np.testing.assert_allclose(out.routing.dense_gates().numpy(), want, rtol=1e-5,
                               atol=1e-7)
    layer = SparselyGatedMoE(6, 3, 4, gating="top_p", top_p_threshold=0.5)
    layer.build((None, 3))
    layer.gate.w_gate.assign(gate.w_gate)
    layer(x, training=True)
    np.testing.assert_allclose(layer.balance_statistics()["experts_per_token"],
                               taken.mean(), rtol=1e-6)


@pytest.mark.parametrize("group_size", [None, 4])
def test_expert_choice_takes_each_experts_top_tokens_per_group(group_size):
    gate = ExpertChoiceGate(num_experts=3, k=2, token_group_size=group_size)
    gate.build((None, 3))
    randomize(gate, 4)
    x = _tokens((10, 3))
    mask = np.ones(10, bool)
    mask[[1, 6]] = False
    out = gate(x, training=False, token_mask=mask)
    probs = _probs(gate, x)
    want = np.zeros_like(probs)
    size = group_size or 10
    for start in range(0, 10, size):
        members = [t for t in range(start, min(start + size, 10)) if mask[t]]
        m = min(math.ceil(2 * len(members) / 3), len(members))
        for e in range(3):
            picked = sorted(members, key=lambda t: (-probs[t, e], t))[:m]
            want[picked, e] = probs[picked, e]
    np.testing.assert_allclose(out.routing.dense_gates().numpy(), want, rtol=1e-5,
                               atol=1e-7)
    assert (want > 0).sum(1).max() == 3 or (want > 0).sum(1).min() == 0  # 0..E experts
    assert not want[~mask].any()


def test_bias_selects_but_does_not_weigh_and_moves_against_the_load():
    gate = NoisyTopKGate(num_experts=4, k=2, noisy_gating=False, bias_update_rate=0.25)
    gate.build((None, 3))
    randomize(gate, 5)
    bias = np.array([3.0, -3.0, 0.0, 0.5], np.float32)
    gate.expert_bias.assign(bias)
    x = _tokens((8, 3))
    out = gate(x, training=True)
    logits = x.astype(np.float64) @ np.asarray(gate.w_gate, np.float64)
    want = np.zeros_like(logits)
    for t, row in enumerate(logits):
        chosen = np.argsort(-(row + bias), kind="stable")[:2]
        want[t, chosen] = ref.softmax(row[chosen])   # unbiased gate values
    np.testing.assert_allclose(out.routing.dense_gates().numpy(), want, rtol=1e-5,
                               atol=1e-7)
    counts = (want > 0).sum(0)
    gate.adapt(tf.constant(counts, tf.float32))
    np.testing.assert_allclose(gate.expert_bias.numpy(),
                               bias + 0.25 * np.sign(counts.mean() - counts))

    # In the layer: no balancing loss, and every training call moves the bias.
    layer = SparselyGatedMoE(4, 2, 4, bias_update_rate=0.25, noisy_gating=False)
    assert (layer.importance_weight, layer.load_weight) == (0.0, 0.0)
    layer.build((None, 3))
    layer(x, training=True)
    assert not layer.losses
    assert np.abs(layer.gate.expert_bias.numpy()).max() > 0
    before = layer.gate.expert_bias.numpy().copy()
    layer(x, training=False)
    np.testing.assert_array_equal(layer.gate.expert_bias.numpy(), before)


def test_hierarchical_z_terms_sum_both_levels():
    gate = HierarchicalNoisyTopKGate(num_groups=3, experts_per_group=3, group_k=2, k=2,
                                     noisy_gating=False)
    gate.build((None, 3))
    randomize(gate, 6)
    x = _tokens((7, 3))
    out = gate(x, training=True)
    w = {v.path.split("/")[-1]: np.asarray(v, np.float64) for v in gate.weights}
    x64 = x.astype(np.float64)
    primary = x64 @ w["w_gate"]
    want = []
    for t in range(7):
        groups = np.argsort(-primary[t], kind="stable")[:2]
        secondary = [np.log(np.exp(x64[t] @ w["w_gate_secondary"][g]).sum()) ** 2
                     for g in groups]
        want.append(np.log(np.exp(primary[t]).sum()) ** 2 + np.mean(secondary))
    np.testing.assert_allclose(out.router_z.numpy(), want, rtol=1e-5)


@pytest.mark.parametrize("settings,problem", [
    (dict(gating="switch", k=2), "`k` must be 1"),
    (dict(gating="top_p", top_p_threshold=1.5), "`top_p_threshold` must be in"),
    (dict(gating="switch", k=1, num_groups=2), "flat"),
    (dict(gating="expert_choice", num_groups=2), "flat"),
    (dict(num_groups=2, bias_update_rate=0.1), "applies to flat top_k"),
    (dict(gating="balanced", bias_update_rate=0.1), "`bias_update_rate` does not apply"),
    (dict(router_z_loss_weight=-1.0), "`router_z_loss_weight` must be >= 0"),
    (dict(gating="top_k", switch_loss_weight=0.1), "applies to gating='switch'"),
    (dict(gating="top_k", normalize_top_k=False), "applies to gating='softmax_top_k'"),
    (dict(gated_experts="swiglu"), "`gated_experts` must be None or one of"),
    (dict(expert_activation="no_such_thing"), "`expert_activation` must name"),
    (dict(gated_experts="glu", compiled_kernels=True), "only the paper's ReLU experts"),
])
def test_router_settings_are_checked(settings, problem):
    with pytest.raises(ValueError, match=problem):
        MoEConfig(**{"num_experts": 8, "k": 2, **settings})


def test_loss_weight_defaults_follow_the_gate():
    assert MoEConfig().importance_weight == 0.1
    for gating, k in (("switch", 1), ("top_p", 2), ("expert_choice", 2)):
        config = MoEConfig(gating=gating, k=k)
        assert (config.importance_weight, config.load_weight) == (0.0, 0.0)
    assert MoEConfig(gating="switch", k=1, load_weight=0.3).load_weight == 0.3


ROUTERS = {
    "switch_sparse": dict(gating="switch", k=1),
    "top_p_capacity": dict(gating="top_p", k=2, top_p_threshold=0.6, dispatch="capacity",
                           capacity_factor=4.0),
    "expert_choice_capacity": dict(gating="expert_choice", k=2, dispatch="capacity",
                                   capacity_group_size=4, capacity_factor=1.0),
    "expert_choice_sparse": dict(gating="expert_choice", k=2),
    "bias_capacity": dict(bias_update_rate=0.01, dispatch="capacity",
                          capacity_factor=4.0, router_z_loss_weight=0.01),
    "softmax_top_k_capacity": dict(gating="softmax_top_k", k=2, router_bias=True,
                                   dispatch="capacity", capacity_factor=4.0),
}


def _layer_with_random_weights(settings, *, seed):
    """A layer built for 4-wide inputs, every trainable weight normal(0, 0.5^2)."""
    layer = SparselyGatedMoE(**settings)
    layer.build((None, 4))
    rng = np.random.default_rng(seed)
    for weight in layer.weights:
        if weight.trainable:
            weight.assign(rng.normal(size=weight.shape).astype(np.float32) * 0.5)
    return layer


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_each_router_in_the_layer_matches_numpy_and_serializes(name):
    """Both dispatches give sum_i G(x)_i E_i(x) for each router's gates (no drop at
    these capacities; expert choice fills its slots exactly); the layer passes the
    shared checks (.keras round trip, fit, mixed precision)."""
    settings = dict(num_experts=4, hidden_size=6, seed=0, **ROUTERS[name])
    layer = _layer_with_random_weights(settings, seed=7)
    x = _tokens((11, 4), seed=8)
    gates = layer.gate_values(x).numpy().astype(np.float64)
    experts = [np.asarray(w, np.float64) for w in (
        layer.experts.kernel_in, layer.experts.bias_in, layer.experts.kernel_out,
        layer.experts.bias_out)]
    np.testing.assert_allclose(layer(x, training=False).numpy(),
                               ref.moe_output(x.astype(np.float64), gates, *experts),
                               rtol=1e-4, atol=1e-5)
    if layer.dispatch == "capacity":   # XLA compiles both calls; inference alike
        infer = tf.function(lambda x: layer(x, training=False), jit_compile=True)
        np.testing.assert_allclose(infer(x).numpy(), layer(x, training=False).numpy(),
                                   rtol=1e-5, atol=1e-6)
        train = tf.function(lambda x: layer(x, training=True), jit_compile=True)
        assert np.all(np.isfinite(train(x).numpy()))
    trainable = {"bias_capacity": 2, "softmax_top_k_capacity": 2}.get(name, 1) + 4
    run_layer_test(SparselyGatedMoE, init_kwargs=settings, input_data=_tokens((2, 5, 4)),
                   expected_output_shape=(2, 5, 4),
                   expected_num_trainable_weights=trainable,
                   expected_num_non_trainable_weights=int(name == "bias_capacity"),
                   float32_sublayers={"gate"})
    assert isinstance(keras.saving.deserialize_keras_object(
        keras.saving.serialize_keras_object(layer)).gate, type(layer.gate))


@pytest.mark.parametrize("dispatch", ["sparse", "capacity"])
def test_gated_experts_in_the_layer_match_numpy_and_serialize(dispatch):
    """SwiGLU experts without biases behind Mixtral's routing: both dispatches give
    sum_i G(x)_i E_i(x); the shared checks (.keras, fit, mixed precision) pass."""
    settings = dict(num_experts=4, k=2, hidden_size=6, gating="softmax_top_k",
                    gated_experts="glu", expert_activation="silu", expert_bias=False,
                    dispatch=dispatch, seed=0)
    if dispatch == "capacity":
        settings.update(capacity_factor=4.0)
    layer = _layer_with_random_weights(settings, seed=5)
    x = _tokens((11, 4), seed=6)
    gates = layer.gate_values(x).numpy().astype(np.float64)
    kernel_in = np.asarray(layer.experts.kernel_in, np.float64)
    kernel_out = np.asarray(layer.experts.kernel_out, np.float64)
    want = np.zeros((11, 4))
    for t, e in zip(*np.nonzero(gates)):
        want[t] += gates[t, e] * ref.gated_expert_ffn(
            x[t].astype(np.float64), kernel_in[e], 0.0, kernel_out[e], 0.0,
            activation="silu", gated="glu")
    np.testing.assert_allclose(layer(x, training=False).numpy(), want, rtol=1e-4, atol=1e-5)
    assert MoEConfig(**{k: v for k, v in settings.items() if k != "seed"}).ops_per_token(
        4) == 4 * 4 + 2 * 3 * 4 * 6
    run_layer_test(SparselyGatedMoE, init_kwargs=settings, input_data=_tokens((2, 5, 4)),
                   expected_output_shape=(2, 5, 4), expected_num_trainable_weights=3,
                   float32_sublayers={"gate"})
