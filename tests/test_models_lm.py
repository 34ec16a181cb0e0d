"""models/lm.py: the paper's compute accounting (Table 7), the models' wiring, and the
config's recorded forms."""

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from models.lm import (LanguageModelConfig, build_language_model, ops_per_timestep,
                       params_excluding_embedding_softmax)
from moe_tf import MoEConfig
from tests.layer_test_helper import seed_scrambling_xors

PAPER = dict(model_dim=512, vocab_size=64)
PAPER_MOE = dict(hidden_size=1024, k=4)


@pytest.mark.parametrize("architecture,num_experts,num_groups,paper_ops", [
    ("4xlstm", 4, None, 8.4e6),
    ("moe-1-wide", 4, None, 8.4e6),
    ("moe-1-deep", 4, None, 8.4e6),
    ("moe", 4, None, 8.4e6),
    ("moe", 32, None, 8.4e6),
    ("moe", 256, None, 8.6e6),
])
def test_ops_per_timestep_match_table_7(architecture, num_experts, num_groups, paper_ops):
    config = LanguageModelConfig(architecture=architecture, moe=MoEConfig(
        num_experts=num_experts, num_groups=num_groups, **PAPER_MOE), **PAPER)
    # The paper gives two significant digits.
    assert ops_per_timestep(config) == pytest.approx(paper_ops, abs=0.06e6)


def test_deep_expert_width_matches_the_paper():
    # Table 7's MoE-1-Deep has four hidden layers of 1024 at this size.
    moe = MoEConfig(**PAPER_MOE)
    assert LanguageModelConfig(architecture="moe-1-deep", moe=moe,
                               **PAPER).deep_hidden_size == 1024
    assert LanguageModelConfig(architecture="moe-1-wide", moe=moe,
                               **PAPER).wide_hidden_size == 4096


@pytest.mark.parametrize("architecture,num_experts,paper_params", [
    ("4xlstm", 4, 8.4e6),
    ("moe-1-wide", 4, 8.4e6),
    ("moe-1-deep", 4, 8.4e6),
    ("moe", 4, 8.4e6),
    ("moe", 32, 37.8e6),
])
def test_parameter_counts_match_table_7(architecture, num_experts, paper_params):
    config = LanguageModelConfig(architecture=architecture, moe=MoEConfig(
        num_experts=num_experts, **PAPER_MOE), **PAPER)
    params = params_excluding_embedding_softmax(build_language_model(config))
    assert params == pytest.approx(paper_params, abs=0.06e6)


@pytest.mark.parametrize("architecture", ["moe", "4xlstm", "moe-1-wide", "moe-1-deep"])
def test_models_map_ids_to_logits_and_ignore_padding(architecture):
    config = LanguageModelConfig(architecture=architecture, vocab_size=50, model_dim=16,
                                 moe=MoEConfig(num_experts=4, k=2, hidden_size=8),
                                 dropout=0.0)
    model = build_language_model(config)
    ids = np.array([[5, 6, 7, 0, 0], [8, 9, 0, 0, 0]], np.int32)
    logits = model(ids).numpy()
    assert logits.shape == (2, 5, 50) and logits.dtype == np.float32
    # Causal and padding-blind: real positions do not depend on what follows them.
    other = ids.copy()
    other[0, 3:] = [11, 12]
    np.testing.assert_allclose(model(other).numpy()[0, :3], logits[0, :3], rtol=1e-5,
                               atol=1e-6)


def test_hierarchical_moe_model_builds():
    config = LanguageModelConfig(vocab_size=50, model_dim=16, moe=MoEConfig(
        num_experts=16, k=2, num_groups=4, hidden_size=8))
    model = build_language_model(config)
    assert model(np.ones((1, 3), np.int32)).shape == (1, 3, 50)
    assert config.experts_per_token == 4


def test_capacity_settings_reach_the_moe_layer():
    config = LanguageModelConfig(vocab_size=50, model_dim=16, moe=MoEConfig(
        num_experts=4, k=2, hidden_size=8, dispatch="capacity", capacity_factor=1.5,
        capacity_group_size=6))
    model = build_language_model(config)
    assert model(np.ones((2, 5), np.int32)).shape == (2, 5, 50)   # 10 tokens, 2 groups
    (moe,) = [layer for layer in model._flatten_layers() if layer.name.startswith("moe")]
    assert (moe.dispatch, moe.capacity_factor, moe.capacity_group_size) == (
        "capacity", 1.5, 6)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="architecture"):
        LanguageModelConfig(architecture="gpt")
    with pytest.raises(ValueError, match="dropout"):
        LanguageModelConfig(dropout=1.0)
    with pytest.raises(ValueError, match="moe must be a moe_tf.MoEConfig"):
        LanguageModelConfig(moe={"k": 2})


def test_every_moe_setting_reaches_the_moe_layer():
    moe = MoEConfig(num_experts=4, k=2, hidden_size=8, gating="balanced",
                    threshold_loss_weight=0.5, importance_weight=0.2, load_weight=0.0,
                    recompute_activations=True, compiled_kernels=False)
    model = build_language_model(LanguageModelConfig(vocab_size=50, model_dim=16, moe=moe))
    assert model.get_layer("moe").config == moe


def test_group_k_counts_in_the_ops_and_the_baselines_widths():
    moe = MoEConfig(num_experts=16, k=2, num_groups=4, group_k=3, hidden_size=8)
    config = LanguageModelConfig(vocab_size=50, model_dim=16, moe=moe)
    assert config.experts_per_token == 6 and config.wide_hidden_size == 48
    d = 16
    gate = 2 * (d * 4 + 3 * d * 4)  # noisy: the primary gate and 3 groups' gates, twice
    assert ops_per_timestep(config) == 2 * 4 * d * 2 * d + gate + 6 * 2 * d * 8
    balanced = dataclasses.replace(config, moe=MoEConfig(num_experts=4, k=2, hidden_size=8,
                                                         gating="balanced"))
    assert ops_per_timestep(balanced) == 2 * 4 * d * 2 * d + d * 4 + 2 * 2 * d * 8


# What train.lm recorded for --preset=tiny before the MoE settings were one MoEConfig.
LEGACY_TINY = {"architecture": "moe", "vocab_size": 512, "model_dim": 32, "num_experts": 4,
               "k": 2, "num_groups": None, "hidden_size": 32, "noisy_gating": True,
               "importance_weight": 0.1, "load_weight": 0.1, "dropout": 0.1,
               "dispatch": "sparse", "capacity_factor": None, "capacity_group_size": None}


def test_from_dict_reads_both_layouts():
    config = LanguageModelConfig(vocab_size=512, model_dim=32,
                                 moe=MoEConfig(num_experts=4, k=2, hidden_size=32))
    assert LanguageModelConfig.from_dict(LEGACY_TINY) == config
    assert LanguageModelConfig.from_dict(dataclasses.asdict(config)) == config
    assert dataclasses.asdict(config)["moe"]["k"] == 2
    # Settings a record predates take their defaults.
    assert LanguageModelConfig.from_dict({}) == LanguageModelConfig()
    legacy = dict(LEGACY_TINY, noisy_gating=False, dispatch="capacity", num_groups=2)
    assert LanguageModelConfig.from_dict(legacy).moe == MoEConfig(
        num_experts=4, k=2, num_groups=2, hidden_size=32, noisy_gating=False,
        dispatch="capacity")
    with pytest.raises(ValueError, match=r"unknown settings \['attention_dim'\]"):
        LanguageModelConfig.from_dict(dict(LEGACY_TINY, attention_dim=8))
    with pytest.raises(ValueError, match=r"MoE settings \['k'\] beside"):
        LanguageModelConfig.from_dict(dict(dataclasses.asdict(config), k=2))
    with pytest.raises(ValueError, match="MoEConfig: `k` \\(5\\) must be <="):
        LanguageModelConfig.from_dict(dict(LEGACY_TINY, k=5))


@pytest.mark.parametrize("architecture", ["moe", "transformer-moe"])
def test_training_call_under_xla_draws_with_philox_named(architecture):
    """Dropout and gating noise by Philox named (moe_tf.philox): no random op of the
    model leaves the algorithm to TensorFlow, whose choice XLA compiles 20x slower."""
    config = LanguageModelConfig(architecture=architecture, vocab_size=50, model_dim=16,
                                 num_layers=2, num_heads=2,
                                 moe=MoEConfig(num_experts=4, k=2, hidden_size=8,
                                               dispatch="capacity"))
    model = build_language_model(config)
    ids = tf.constant([[5, 6, 7, 0], [8, 9, 0, 0]])
    assert seed_scrambling_xors(lambda ids: model(ids, training=True), ids) == 0
