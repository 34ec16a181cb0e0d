"""models/transformer.py: the attention against NumPy, the blocks' shared layer checks,
causality, padding, checkpoints, and the compute accounting."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from models.lm import LanguageModelConfig, build_language_model, ops_per_timestep
from models.transformer import CausalSelfAttention, PositionalEncoding, TransformerBlock
from moe_tf import MoEConfig, SparselyGatedMoE
from tests import numpy_reference as ref
from tests.layer_test_helper import run_layer_test

TINY_MOE = MoEConfig(num_experts=4, k=2, hidden_size=8)


def _randomize(layer, seed=0, scale=0.5):
    rng = np.random.default_rng(seed)
    for weight in layer.trainable_weights:
        weight.assign(rng.normal(0.0, scale, weight.shape).astype(np.float32))


def _tokens(shape=(2, 5, 8), seed=1):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_attention_matches_numpy():
    layer = CausalSelfAttention(num_heads=2)
    x = _tokens()
    layer.build(x.shape)
    _randomize(layer)
    qkv = x.astype(np.float64) @ np.asarray(layer.qkv.kernel) + np.asarray(layer.qkv.bias)
    q, k, v = np.split(qkv.reshape(2, 5, 3, 2, 4), 3, axis=2)
    q, k, v = (a[:, :, 0] for a in (q, k, v))                    # [b, t, heads, 4]
    scores = np.einsum("bqhe,bkhe->bhqk", q, k) / 2.0
    scores = np.where(np.tril(np.ones((5, 5), bool)), scores, -np.inf)
    context = np.einsum("bhqk,bkhe->bqhe", ref.softmax(scores), v).reshape(2, 5, 8)
    want = context @ np.asarray(layer.output_projection.kernel) + np.asarray(
        layer.output_projection.bias)
    np.testing.assert_allclose(layer(x).numpy(), want, rtol=1e-5, atol=1e-5)


def test_positional_encoding_matches_the_formula():
    x = _tokens((1, 3, 6))
    got = PositionalEncoding()(x).numpy()
    position = np.arange(3)[:, None]
    angles = position / 10000.0 ** (np.arange(3) / 3)
    want = x * math.sqrt(6) + np.concatenate([np.sin(angles), np.cos(angles)], -1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cls,kwargs,trainable", [
    (CausalSelfAttention, dict(num_heads=2), 4),
    (TransformerBlock, dict(num_heads=2, hidden_size=16, dropout=0.1), 12),
    (TransformerBlock, dict(num_heads=2, hidden_size=16, moe=TINY_MOE), 14),
    (PositionalEncoding, {}, 0),
])
def test_transformer_layers_shared_checks(cls, kwargs, trainable):
    run_layer_test(cls, init_kwargs=kwargs, input_data=_tokens(),
                   expected_output_shape=(2, 5, 8),
                   expected_num_trainable_weights=trainable,
                   run_training_test=trainable > 0,
                   # The MoE's gate computes in float32.
                   float32_sublayers={"gate"}, atol=1e-5)


def _config(architecture="transformer-moe", **kwargs):
    return LanguageModelConfig(**{
        "architecture": architecture, "vocab_size": 40, "model_dim": 8, "moe": TINY_MOE,
        "dropout": 0.0, "num_layers": 2, "num_heads": 2, **kwargs})


def test_later_tokens_and_padding_do_not_change_earlier_logits():
    model = build_language_model(_config())
    _randomize(model)
    ids = np.array([[3, 7, 9, 11, 5, 2]], np.int32)
    full = model(ids).numpy()
    changed = ids.copy()
    changed[0, 4:] = [8, 8]
    padded = ids.copy()
    padded[0, 4:] = 0
    np.testing.assert_allclose(model(changed).numpy()[:, :4], full[:, :4], rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_allclose(model(padded).numpy()[:, :4], full[:, :4], rtol=1e-5,
                               atol=1e-5)
    assert np.abs(model(changed).numpy()[:, 4:] - full[:, 4:]).max() > 1e-3


def test_moe_is_in_every_second_block_and_gets_the_padding_mask():
    config = _config(num_layers=4)
    model = build_language_model(config)
    moes = [layer for layer in model._flatten_layers()
            if isinstance(layer, SparselyGatedMoE)]
    assert [layer.name for layer in moes] == ["block_2_moe", "block_4_moe"]
    dense = build_language_model(_config("transformer", num_layers=4))
    assert not [layer for layer in dense._flatten_layers()
                if isinstance(layer, SparselyGatedMoE)]
    ids = np.array([[3, 7, 9, 0, 0], [4, 0, 0, 0, 0]], np.int32)
    model(ids, training=True)
    # Only the 4 real tokens are routed: 4 tokens * k = 8 assignments per layer.
    for layer in moes:
        np.testing.assert_allclose(layer.balance_statistics()["experts_per_token"], 2.0)
        np.testing.assert_allclose(layer.balance_statistics()["load_fraction"].numpy()
                                   .sum(), 1.0, rtol=1e-6)


def test_a_checkpoint_holds_every_weight(tmp_path):
    """Every variable is reachable by a checkpoint (sublayers as attributes)."""
    model = build_language_model(_config())
    _randomize(model)
    path = tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    fresh = build_language_model(_config())
    tf.train.Checkpoint(model=fresh).read(path).assert_consumed()
    ids = np.array([[3, 7, 9, 11]], np.int32)
    np.testing.assert_array_equal(fresh(ids).numpy(), model(ids).numpy())


def test_ops_count_the_attention_and_equal_the_dense_twin_but_for_the_gate():
    moe = _config(num_layers=4)
    dense = _config("transformer", num_layers=4)
    d, wide, length = 8, 2 * 8, 20
    per_block = 4 * d * d + d * (length + 1) + 2 * d * wide
    assert ops_per_timestep(dense, sequence_length=length) == 4 * per_block
    gates = 2 * (2 * d * 4)  # two MoE blocks, x W_g and x W_noise over 4 experts
    assert ops_per_timestep(moe, sequence_length=length) == 4 * per_block + gates
    with pytest.raises(ValueError, match="sequence_length"):
        ops_per_timestep(moe)


@pytest.mark.parametrize("settings,problem", [
    (dict(model_dim=10, num_heads=4), "divisible by num_heads"),
    (dict(num_layers=1), "num_layers must be >= 2"),
    (dict(num_heads=0), "num_heads must be >= 1"),
])
def test_transformer_sizes_are_checked(settings, problem):
    values = dict(architecture="transformer-moe", model_dim=8, num_layers=2, num_heads=2)
    with pytest.raises(ValueError, match=problem):
        LanguageModelConfig(**{**values, **settings})


def test_transformer_config_reads_runs_recorded_before_it():
    recorded = {"architecture": "moe", "vocab_size": 40, "model_dim": 8,
                "moe": {"num_experts": 4, "k": 2}, "dropout": 0.1}
    config = LanguageModelConfig.from_dict(recorded)
    assert (config.num_layers, config.num_heads) == (4, 4)
    assert keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(
        TransformerBlock(num_heads=2, hidden_size=4, moe=TINY_MOE))).moe == TINY_MOE
