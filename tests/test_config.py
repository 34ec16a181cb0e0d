"""MoEConfig (one validated value for every MoE setting) and the gate registry."""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from moe_tf import (GATES, Gate, GateOutput, MoEConfig, NoisyTopKGate, SparselyGatedMoE,
                    StrictlyBalancedGate, register_gate)
from moe_tf import kernels
from moe_tf.routing import SlotRouting


def test_defaults_are_resolved_per_gate_and_dispatch():
    top_k = MoEConfig()
    assert (top_k.noisy_gating, top_k.noise_epsilon) == (True, 1e-2)
    assert top_k.threshold_loss_weight is None and top_k.capacity_factor is None
    balanced = MoEConfig(gating="balanced")
    assert balanced.threshold_loss_weight == 1.0
    assert balanced.noisy_gating is None and balanced.noise_epsilon is None
    assert MoEConfig(dispatch="capacity").capacity_factor == 2.0
    assert MoEConfig(dispatch="capacity", capacity_factor=1.25).capacity_factor == 1.25


@pytest.mark.parametrize("values", [
    {}, dict(gating="balanced", k=2), dict(num_groups=4, group_k=2, k=2),
    dict(dispatch="capacity", capacity_group_size=64, compiled_kernels=False)])
def test_a_built_config_round_trips_through_asdict(values):
    config = MoEConfig(**values)
    assert MoEConfig(**dataclasses.asdict(config)) == config
    assert MoEConfig.from_dict(dataclasses.asdict(config)) == config


@pytest.mark.parametrize("values, message", [
    (dict(gating="balanced", noisy_gating=False),
     "`noisy_gating` does not apply to gating='balanced'"),
    (dict(gating="balanced", noise_epsilon=0.1),
     "`noise_epsilon` does not apply to gating='balanced'"),
    (dict(threshold_loss_weight=0.5),
     "`threshold_loss_weight` does not apply to gating='top_k'.*gating='balanced'"),
    (dict(gating="balanced", num_groups=2), "flat; it takes no `num_groups`"),
    (dict(compiled_kernels="yes"), "`compiled_kernels`"),
    (dict(recompute_activations=1), "`recompute_activations`"),
    (dict(capacity_factor=2.0), "only applies to dispatch='capacity'"),
    (dict(threshold_loss_weight=-1.0, gating="balanced"), "`threshold_loss_weight`"),
])
def test_settings_that_do_not_apply_are_refused_naming_both(values, message):
    with pytest.raises(ValueError, match=message):
        MoEConfig(**values)
    # The layer's keyword arguments go through the same validator.
    with pytest.raises(ValueError, match="SparselyGatedMoE: .*" + message):
        SparselyGatedMoE(**{"num_experts": 8, "k": 2, "hidden_size": 4, **values})


def test_replace_rederives_the_settings_of_a_new_gate_or_dispatch():
    config = MoEConfig(k=2, dispatch="capacity", capacity_factor=1.5)
    balanced = config.replace(gating="balanced")
    assert balanced.noisy_gating is None and balanced.threshold_loss_weight == 1.0
    assert balanced.capacity_factor == 1.5
    assert config.replace(dispatch="sparse").capacity_factor is None
    assert config.replace(k=1).k == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.k = 3


def test_from_dict_reads_configs_written_before_gates_declared_their_settings():
    # Every gate setting was written at its old default, whatever the gate.
    legacy = dict(num_experts=4, k=2, hidden_size=8, gating="balanced", noisy_gating=True,
                  noise_epsilon=1e-2, threshold_loss_weight=1.0, importance_weight=0.1,
                  load_weight=0.1, dispatch="sparse", capacity_factor=None,
                  capacity_group_size=None, recompute_activations=False,
                  compiled_kernels=True, output_size=None)
    config = MoEConfig.from_dict(legacy)
    # Its compiled_kernels=True (the old default) meant "auto".
    assert config == MoEConfig(num_experts=4, k=2, hidden_size=8, gating="balanced")
    # A non-default value of a setting the gate does not read is still refused.
    with pytest.raises(ValueError, match="`noisy_gating`"):
        MoEConfig.from_dict({**legacy, "noisy_gating": False})


def test_layer_takes_a_config_or_keywords_not_both():
    config = MoEConfig(num_experts=4, k=2, hidden_size=8, gating="balanced")
    layer = SparselyGatedMoE(config=config)
    assert layer.config is config
    assert (layer.num_experts, layer.k, layer.gating) == (4, 2, "balanced")
    assert isinstance(layer.gate, StrictlyBalancedGate)
    assert SparselyGatedMoE(4, 2, 8, gating="balanced").config == config
    with pytest.raises(ValueError, match="not both"):
        SparselyGatedMoE(4, config=config)
    with pytest.raises(ValueError, match="moe_tf.MoEConfig"):
        SparselyGatedMoE(config={"num_experts": 4})
    revived = SparselyGatedMoE.from_config(layer.get_config())
    assert revived.config == config


def test_layer_reads_layer_configs_written_before_moe_config():
    config = SparselyGatedMoE(4, 2, 8, gating="balanced").get_config()
    config.update(noisy_gating=True, noise_epsilon=1e-2)  # as the old layer wrote them
    assert SparselyGatedMoE.from_config(config).config.noisy_gating is None


def test_compiled_kernels_true_needs_them_built(monkeypatch):
    monkeypatch.setattr(kernels, "op_library", lambda: None)  # as where they are not built
    with pytest.raises(ValueError, match="compiled_kernels=True.*not built"):
        SparselyGatedMoE(4, 2, 8, compiled_kernels=True)
    # "auto" (the default) and False run without them.
    for value in ("auto", False):
        layer = SparselyGatedMoE(4, 2, 8, compiled_kernels=value)
        assert layer(np.ones((3, 4), np.float32), training=True).shape == (3, 4)


def test_kernels_build_for_the_best_instruction_set_the_cpu_has():
    v3 = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave", "sse4_2"}
    v4 = v3 | {"avx512f", "avx512dq", "avx512bw", "avx512vl", "avx512cd"}
    assert kernels.target_march(v4) == "x86-64-v4"
    assert kernels.target_march(v3) == "x86-64-v3"
    assert kernels.target_march(v4 - {"avx512bw"}) == "x86-64-v3"
    assert kernels.target_march(v3 - {"fma"}) is None  # AVX2 without FMA: not built
    assert kernels.target_march(set()) is None


class FirstExpertGate(Gate):
    """A toy router: every token goes to expert 0 with gate 1."""

    def __init__(self, *, num_experts: int, **kwargs):
        super().__init__(**kwargs)
        self.num_experts = num_experts
        self.k = 1

    @classmethod
    def from_moe_config(cls, config, *, seed, name):
        return cls(num_experts=config.num_experts, seed=seed, name=name)

    def call(self, inputs, *, training=None, token_mask=None):
        tokens = tf.shape(inputs)[0]
        gate = tf.ones([tokens, 1]) if token_mask is None else tf.cast(
            token_mask, tf.float32)[:, None]
        routing = SlotRouting(expert_index=tf.zeros([tokens, 1], tf.int32), gate=gate,
                              num_experts=self.num_experts)
        return GateOutput(routing=routing, importance=routing.importance(),
                          load=routing.expert_counts())

    def get_config(self):
        return {**super().get_config(), "num_experts": self.num_experts}


def test_a_new_router_is_one_class_and_one_registration():
    register_gate("first_expert")(FirstExpertGate)
    try:
        layer = SparselyGatedMoE(4, 1, 8, gating="first_expert")
        x = np.random.default_rng(0).normal(size=(5, 3)).astype(np.float32)
        y = layer(x, training=True)
        experts = layer.experts
        want = (np.maximum(x @ experts.kernel_in[0].numpy() + experts.bias_in[0].numpy(), 0)
                @ experts.kernel_out[0].numpy() + experts.bias_out[0].numpy())
        np.testing.assert_allclose(y.numpy(), want, rtol=1e-5, atol=1e-6)
        with pytest.raises(ValueError, match="`noisy_gating` does not apply"):
            SparselyGatedMoE(4, 1, 8, gating="first_expert", noisy_gating=True)
        with pytest.raises(ValueError, match="flat"):
            SparselyGatedMoE(4, 1, 8, gating="first_expert", num_groups=2)
        # A gate says whether DTensor may split its batch; this one does not.
        from tensorflow.experimental import dtensor

        from moe_tf import ExpertSharding
        mesh = dtensor.create_mesh([("batch", 1), ("expert", 1)], devices=["CPU:0"],
                                   device_type="CPU")
        with pytest.raises(ValueError, match="needs gating='top_k'/'balanced'"):
            SparselyGatedMoE(4, 1, 8, gating="first_expert",
                             dispatch="capacity").shard_experts(ExpertSharding(mesh))
    finally:
        del GATES["first_expert"]
    assert set(GATES) == {"top_k", "balanced", "switch", "top_p", "expert_choice",
                          "softmax_top_k"}
    assert GATES["top_k"] is NoisyTopKGate


def test_gating_module_is_not_shadowed_by_the_argument():
    import moe_tf.sparsely_gated_moe as layer_module

    assert not hasattr(layer_module, "gating")
    assert isinstance(SparselyGatedMoE(4, 2, 8).gate, keras.layers.Layer)


def test_compiled_kernels_true_names_why_they_cannot_run():
    from moe_tf import experts as experts_module

    with pytest.raises(ValueError, match="compiled_kernels=True.*float16.*float32 only"):
        kernels.op_library_for(tf.zeros([2, 16], tf.float16), required=True)
    assert kernels.op_library_for(tf.zeros([2, 16], tf.float16)) is None  # "auto"
    with pytest.raises(ValueError, match=r"widths.*\(5, 16, 16\).*multiples of 16"):
        experts_module._compiled_kernels_for(tf.zeros([2, 5]), tf.zeros([3, 5, 16]),
                                             tf.zeros([3, 16, 16]), required=True)
    if kernels.op_library() is None:
        with pytest.raises(ValueError, match="not built"):
            kernels.op_library_for(tf.zeros([2, 16]), required=True)


@pytest.mark.parametrize("dispatch", ["sparse", "capacity"])
@pytest.mark.parametrize("gating", sorted(GATES))
def test_depends_on_token_order_says_whether_shuffling_changes_the_outputs(gating,
                                                                           dispatch):
    """At inference, every token's output is the same in a shuffled call exactly where the
    config says so (packed scoring, which reorders the tokens, relies on it)."""
    settings = dict(capacity_factor=0.5) if dispatch == "capacity" else {}
    config = MoEConfig(num_experts=4, k=1 if gating == "switch" else 2, hidden_size=8,
                       gating=gating, dispatch=dispatch, **settings)
    layer = SparselyGatedMoE(config=config)
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=[24, 6]).astype(np.float32)
    layer(tokens)
    for weight in layer.weights:  # gates away from their all-equal zero start
        weight.assign(rng.normal(0.0, 0.5, weight.shape).astype(np.float32))
    order = rng.permutation(len(tokens))
    together = layer(tokens, training=False).numpy()
    shuffled = layer(tokens[order], training=False).numpy()[np.argsort(order)]
    assert np.allclose(together, shuffled, atol=1e-5) != config.depends_on_token_order
