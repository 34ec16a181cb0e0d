"""models/lm.py: the paper's compute accounting (Table 7) and the models' wiring."""

import numpy as np
import pytest

from models.lm import (LanguageModelConfig, build_language_model, ops_per_timestep,
                       params_excluding_embedding_softmax)

PAPER = dict(model_dim=512, hidden_size=1024, k=4, vocab_size=64)


@pytest.mark.parametrize("architecture,num_experts,num_groups,paper_ops", [
    ("4xlstm", 4, None, 8.4e6),
    ("moe-1-wide", 4, None, 8.4e6),
    ("moe-1-deep", 4, None, 8.4e6),
    ("moe", 4, None, 8.4e6),
    ("moe", 32, None, 8.4e6),
    ("moe", 256, None, 8.6e6),
])
def test_ops_per_timestep_match_table_7(architecture, num_experts, num_groups, paper_ops):
    config = LanguageModelConfig(architecture=architecture, num_experts=num_experts,
                                 num_groups=num_groups, **PAPER)
    # The paper gives two significant digits.
    assert ops_per_timestep(config) == pytest.approx(paper_ops, abs=0.06e6)


def test_deep_expert_width_matches_the_paper():
    # Table 7's MoE-1-Deep has four hidden layers of 1024 at this size.
    assert LanguageModelConfig(architecture="moe-1-deep", **PAPER).deep_hidden_size == 1024
    assert LanguageModelConfig(architecture="moe-1-wide", **PAPER).wide_hidden_size == 4096


@pytest.mark.parametrize("architecture,num_experts,paper_params", [
    ("4xlstm", 4, 8.4e6),
    ("moe-1-wide", 4, 8.4e6),
    ("moe-1-deep", 4, 8.4e6),
    ("moe", 4, 8.4e6),
    ("moe", 32, 37.8e6),
])
def test_parameter_counts_match_table_7(architecture, num_experts, paper_params):
    config = LanguageModelConfig(architecture=architecture, num_experts=num_experts,
                                 **PAPER)
    params = params_excluding_embedding_softmax(build_language_model(config))
    assert params == pytest.approx(paper_params, abs=0.06e6)


@pytest.mark.parametrize("architecture", ["moe", "4xlstm", "moe-1-wide", "moe-1-deep"])
def test_models_map_ids_to_logits_and_ignore_padding(architecture):
    config = LanguageModelConfig(architecture=architecture, vocab_size=50, model_dim=16,
                                 num_experts=4, k=2, hidden_size=8, dropout=0.0)
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
    config = LanguageModelConfig(vocab_size=50, model_dim=16, num_experts=16, k=2,
                                 num_groups=4, hidden_size=8)
    model = build_language_model(config)
    assert model(np.ones((1, 3), np.int32)).shape == (1, 3, 50)
    assert config.experts_per_token == 4


def test_capacity_settings_reach_the_moe_layer():
    config = LanguageModelConfig(vocab_size=50, model_dim=16, num_experts=4, k=2,
                                 hidden_size=8, dispatch="capacity", capacity_factor=1.5,
                                 capacity_group_size=6)
    model = build_language_model(config)
    assert model(np.ones((2, 5), np.int32)).shape == (2, 5, 50)   # 10 tokens, 2 groups
    (moe,) = [layer for layer in model._flatten_layers() if layer.name.startswith("moe")]
    assert (moe.dispatch, moe.capacity_factor, moe.capacity_group_size) == (
        "capacity", 1.5, 6)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="architecture"):
        LanguageModelConfig(architecture="transformer")
    with pytest.raises(ValueError, match="dropout"):
        LanguageModelConfig(dropout=1.0)
