"""The translation model: the attention (models/attention.py), the encoder-decoder wiring
(models/translator.py), the config and its ops accounting (models/translation_config.py),
beam search (models/beam_search.py)."""

import dataclasses
import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

from models.attention import TanhProductAttention
from models import beam_search as beam_search_module
from models.beam_search import beam_search, top_k_by_blocks
from models.projected_lstm import ProjectedLSTM
from models.special_tokens import BOS_ID, EOS_ID, PAD_ID
from models.translation_config import TRANSLATION_MOE, TranslationConfig, ops_per_timestep
from models.translator import (Translator, build_translator,
                               params_excluding_embedding_softmax)
from moe_tf import MoEConfig, SparselyGatedMoE
from tests.layer_test_helper import run_layer_test, seed_scrambling_xors

TINY_MOE = TRANSLATION_MOE.replace(num_experts=4, k=2, hidden_size=8)
TINY = dict(vocab_size=12, model_dim=8, attention_dim=6, moe=TINY_MOE, dropout=0.0)


def tiny_model(seed=0, softmax_scale=1.0, eos_bias=0.0, **kwargs):
    """A small random Translator; `softmax_scale` > 1 makes its distributions peaky and
    `eos_bias` > 0 makes it end sentences sooner."""
    keras.utils.set_random_seed(seed)
    model = build_translator(TranslationConfig(**{**TINY, **kwargs}))
    rng = np.random.default_rng(seed)
    for weight in model.trainable_weights:
        weight.assign(rng.normal(0.0, 0.5, weight.shape).astype(np.float32))
    model.softmax.kernel.assign(model.softmax.kernel * softmax_scale)
    model.softmax.bias.assign(model.softmax.bias + eos_bias * np.eye(
        model.config.vocab_size, dtype=np.float32)[EOS_ID])
    return model


def test_training_call_under_xla_draws_with_philox_named():
    """Dropout and gating noise by Philox named (moe_tf.philox; see test_models_lm)."""
    model = tiny_model(dropout=0.1, moe=TINY_MOE.replace(dispatch="capacity"))
    source, target = tf.constant([[3, 4, 5, 0]]), tf.constant([[1, 6, 7]])
    assert seed_scrambling_xors(lambda s, t: model((s, t), training=True), source,
                                target) == 0


# ----------------------------------------------------------------------------- attention

def test_attention_matches_the_papers_formula_in_numpy():
    layer = TanhProductAttention(units=3)
    U = np.array([[0.5, -1.0, 0.25], [1.5, 0.0, -0.5]], np.float32)     # [memory_dim 2, 3]
    W = np.array([[1.0, 0.5, -0.5], [-0.25, 2.0, 1.0]], np.float32)     # [query_dim 2, 3]
    V = np.array([1.0, -2.0, 0.5], np.float32)
    queries = np.array([[[1.0, 0.0], [0.5, -1.0]]], np.float32)         # y_j: [1, 2, 2]
    memory = np.array([[[0.0, 1.0], [2.0, -1.0], [1.0, 1.0]]], np.float32)  # x_i: [1, 3, 2]
    mask = np.array([[True, True, False]])
    layer.build((queries.shape, memory.shape))
    layer.U.assign(U)
    layer.W.assign(W)
    layer.V.assign(V)
    context, weights = layer((queries, memory), memory_mask=mask, return_weights=True)

    # A(x_i, y_j) = sum_d V_d tanh((x_i U)_d) tanh((y_j W)_d), one pair at a time.
    scores = np.zeros((2, 3))
    for j, i in itertools.product(range(2), range(3)):
        xu, yw = memory[0, i] @ U, queries[0, j] @ W
        scores[j, i] = sum(V[d] * np.tanh(xu[d]) * np.tanh(yw[d]) for d in range(3))
    real = scores[:, :2]
    expected_weights = np.exp(real) / np.exp(real).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(weights[0, :, :2], expected_weights, rtol=1e-6)
    assert np.all(weights.numpy()[0, :, 2] == 0.0)  # padding gets no weight
    np.testing.assert_allclose(context[0], expected_weights @ memory[0, :2], rtol=1e-6)


def test_attention_ignores_what_padding_holds():
    layer = TanhProductAttention(units=4)
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(2, 3, 5)).astype(np.float32)
    memory = rng.normal(size=(2, 4, 6)).astype(np.float32)
    mask = np.array([[True, True, True, False], [True, False, False, False]])
    context = layer((queries, memory), memory_mask=mask).numpy()
    assert context.shape == (2, 3, 6)
    junk = np.where(mask[:, :, None], memory, 100.0).astype(np.float32)
    np.testing.assert_allclose(layer((queries, junk), memory_mask=mask), context,
                               rtol=1e-6)
    # Without the mask the padding would count.
    assert not np.allclose(layer((queries, junk)), context, atol=1e-3)
    assert TanhProductAttention.from_config(layer.get_config()).get_config() == \
        layer.get_config()


def test_projected_lstm_shared_layer_checks():
    data = np.random.default_rng(0).normal(size=(2, 5, 6)).astype(np.float32)
    for bidirectional in (False, True):
        run_layer_test(ProjectedLSTM, init_kwargs=dict(units=10, output_dim=4,
                                                       bidirectional=bidirectional),
                       input_data=data, expected_output_shape=(2, 5, 4), atol=1e-5)


def test_bidirectional_projected_lstm_equals_keras_bidirectional():
    """The gather-based time reversal (DTensor has no tf.reverse) computes what Keras's
    Bidirectional does with go_backwards, padding masked, gradients included."""
    layer = ProjectedLSTM(units=6, output_dim=6, bidirectional=True)
    data = tf.constant(np.random.default_rng(1).normal(size=(2, 5, 4)), tf.float32)
    mask = tf.constant([[True] * 5, [True, True, True, False, False]])
    layer(data, mask=mask)
    results = []
    for run in (lambda: layer(data, mask=mask), lambda: layer.lstm(data, mask=mask)):
        with tf.GradientTape() as tape:
            tape.watch(data)
            outputs = run()
            loss = tf.reduce_sum(outputs * tf.range(6, dtype=tf.float32))
        results.append([outputs] + tape.gradient(loss, [data] + layer.trainable_weights))
    for got, want in zip(*results):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # The backward half is not the forward one (the check can fail).
    assert not np.allclose(results[0][0][..., 3:], results[0][0][..., :3], atol=1e-3)


# ----------------------------------------------------------------------------- the model

def test_shapes_and_step_decoding_equal_teacher_forcing():
    model = tiny_model()
    source = np.array([[5, 6, 7, EOS_ID], [8, EOS_ID, 0, 0]], np.int32)
    target = np.array([[BOS_ID, 9, 10, 11], [BOS_ID, 4, 0, 0]], np.int32)
    logits = model((source, target), training=False).numpy()
    assert logits.shape == (2, 4, 12) and logits.dtype == np.float32
    encoded = model.encode(source)
    assert encoded.memory.shape == (2, 4, 8) and encoded.keys.shape == (2, 4, 6)
    state = model.initial_decoder_state(2)
    for t in range(4):
        step_logits, state = model.decode_step(tf.constant(target[:, t]), state, encoded)
        assert step_logits.shape == (2, 12)
        np.testing.assert_allclose(step_logits[0], logits[0, t], rtol=1e-5, atol=1e-5)
        if t < 2:
            np.testing.assert_allclose(step_logits[1], logits[1, t], rtol=1e-5,
                                       atol=1e-5)


@pytest.mark.parametrize("architecture", ["moe", "dense"])
def test_source_padding_changes_nothing(architecture):
    model = tiny_model(architecture=architecture)
    source = np.array([[5, 6, EOS_ID]], np.int32)
    target = np.array([[BOS_ID, 9, 10]], np.int32)
    alone = model((source, target), training=False).numpy()
    padded = np.array([[5, 6, EOS_ID, 0, 0, 0], [4, 5, 6, 7, 8, EOS_ID]], np.int32)
    batch = model((padded, np.repeat(target, 2, axis=0)), training=False).numpy()
    np.testing.assert_allclose(batch[0], alone[0], rtol=1e-5, atol=1e-5)


BRANCHES = ("encoder_lstm_1", "encoder_lstm_2", "encoder_moe", "encoder_lstm_3",
            "decoder_lstm_1", "decoder_moe", "decoder_lstm_2")


def record_calls(model, zero_branches=False):
    """Replaces the layers' calls by ones that log their order (and can zero a branch)."""
    order = []

    def wrap(owner, method, name, zero):
        original = getattr(owner, method)

        def wrapped(*args, **kwargs):
            order.append(name)
            output = original(*args, **kwargs)
            return tf.zeros_like(output) if zero else output

        setattr(owner, method, wrapped)

    for name in ("embedding", "softmax") + BRANCHES:
        if getattr(model, name) is not None:
            wrap(getattr(model, name), "call", name, zero_branches and name in BRANCHES)
    wrap(model.attention, "keys", "attention_keys", False)
    wrap(model.attention, "attend", "attention", False)
    return order


def test_layer_order_puts_the_moes_between_the_papers_layers():
    model = tiny_model()
    order = record_calls(model)
    model((np.array([[5, EOS_ID]]), np.array([[BOS_ID, 6]])), training=False)
    assert order == ["embedding", "encoder_lstm_1", "encoder_lstm_2", "encoder_moe",
                     "encoder_lstm_3", "attention_keys", "embedding", "decoder_lstm_1",
                     "attention", "decoder_moe", "decoder_lstm_2", "softmax"]
    d = TINY["model_dim"]
    # The encoder MoE reads the residual stream; the decoder's reads it with the context.
    assert model.encoder_moe.w_gate.shape == (d, 4)
    assert model.decoder_moe.w_gate.shape == (2 * d, 4)
    assert model.encoder_lstm_1.bidirectional and not model.encoder_lstm_2.bidirectional
    assert {layer.name for layer in model._flatten_layers()
            if isinstance(layer, SparselyGatedMoE)} == {"encoder_moe", "decoder_moe"}
    assert model.encoder_moe.gating == "balanced"


@pytest.mark.parametrize("architecture", ["moe", "dense"])
def test_every_lstm_and_moe_is_a_residual_branch(architecture):
    model = tiny_model(architecture=architecture)
    record_calls(model, zero_branches=True)
    source, target = np.array([[5, 6, EOS_ID]]), np.array([[BOS_ID, 7, 8]])
    # With every branch silenced only the embeddings reach the softmax.
    np.testing.assert_allclose(model((source, target), training=False),
                               model.softmax(model.embedding(target)), rtol=1e-6)


def test_dense_model_has_no_moe_and_wider_lstms():
    config = TranslationConfig(architecture="dense",
                               **{**TINY, "moe": TINY_MOE.replace(hidden_size=64)})
    model = build_translator(config)
    assert not any(isinstance(layer, SparselyGatedMoE) for layer in model._flatten_layers())
    assert model.encoder_moe is None and model.decoder_moe is None
    assert config.lstm_width > config.model_dim
    assert model.decoder_lstm_1.lstm.units == config.lstm_width
    assert model.decoder_lstm_1.projection.kernel.shape == (config.lstm_width, 8)


def test_dense_lstm_width_overrides_the_matched_width():
    config = TranslationConfig(architecture="dense", dense_lstm_width=12, **TINY)
    model = build_translator(config)
    assert config.lstm_width == 12
    assert {layer.units for layer in (model.encoder_lstm_1, model.encoder_lstm_2,
                                      model.encoder_lstm_3, model.decoder_lstm_1,
                                      model.decoder_lstm_2)} == {12}
    assert ops_per_timestep(config) == ops_from_weights(model)
    # At model_dim wide the LSTMs need no projection.
    narrow = build_translator(dataclasses.replace(config, dense_lstm_width=8))
    assert narrow.encoder_lstm_2.projection is None
    assert ops_per_timestep(narrow.config) < ops_per_timestep(config)
    for kwargs, message in ((dict(architecture="moe", dense_lstm_width=12),
                             "dense_lstm_width is for the dense model"),
                            (dict(architecture="dense", dense_lstm_width=13),
                             "dense_lstm_width must be even")):
        with pytest.raises(ValueError, match=message):
            TranslationConfig(**TINY, **kwargs)


def test_config_round_trip_and_errors():
    model = tiny_model()
    revived = Translator.from_config(model.get_config())
    assert revived.config == model.config and revived.name == model.name
    with pytest.raises(ValueError, match="architecture"):
        TranslationConfig(architecture="transformer")
    with pytest.raises(ValueError, match="gating"):
        TranslationConfig(moe=MoEConfig(gating="random"))
    with pytest.raises(ValueError, match="model_dim must be even"):
        TranslationConfig(model_dim=7)


def test_moe_settings_default_to_the_papers_and_reach_both_layers():
    assert TranslationConfig().moe == MoEConfig(gating="balanced", importance_weight=0.01,
                                                load_weight=0.01)
    moe = TINY_MOE.replace(gating="top_k", noisy_gating=False, importance_weight=0.3,
                           dispatch="capacity", capacity_factor=1.5)
    model = tiny_model(moe=moe)
    for layer in (model.encoder_moe, model.decoder_moe):
        assert layer.config == moe and layer.output_size == TINY["model_dim"]
    with pytest.raises(ValueError, match="MoE layers are flat"):
        TranslationConfig(moe=MoEConfig(num_experts=4, k=2, num_groups=2))


# What train.nmt recorded for --preset=tiny before the MoE settings were one MoEConfig:
# the balanced gating listed noisy_gating (unread) as well.
LEGACY_TINY = {"architecture": "moe", "vocab_size": 512, "num_language_tokens": 0,
               "model_dim": 32, "attention_dim": 32, "num_experts": 4, "k": 2,
               "hidden_size": 32, "gating": "balanced", "noisy_gating": True,
               "importance_weight": 0.01, "load_weight": 0.01, "dropout": 0.1,
               "dispatch": "sparse", "dense_lstm_width": 0, "capacity_factor": None,
               "capacity_group_size": None}


def test_from_dict_reads_both_layouts():
    config = TranslationConfig(vocab_size=512, model_dim=32, attention_dim=32,
                               moe=TRANSLATION_MOE.replace(num_experts=4, k=2,
                                                           hidden_size=32))
    assert TranslationConfig.from_dict(LEGACY_TINY) == config
    assert config.moe.noisy_gating is None and config.moe.threshold_loss_weight == 1.0
    assert TranslationConfig.from_dict(dataclasses.asdict(config)) == config
    # Unread gate settings were recorded whatever their value; the translation defaults
    # (not MoEConfig's) fill what an old record lacks.
    legacy = {name: value for name, value in LEGACY_TINY.items()
              if name not in ("gating", "importance_weight", "load_weight")}
    assert TranslationConfig.from_dict(dict(legacy, noisy_gating=False)) == config
    multilingual = dict(LEGACY_TINY, gating="top_k", noisy_gating=False,
                        num_language_tokens=2)
    assert TranslationConfig.from_dict(multilingual) == dataclasses.replace(
        config, num_language_tokens=2, moe=config.moe.replace(gating="top_k",
                                                              noisy_gating=False))
    # Translator configs (get_config) of both layouts revive.
    for recorded in (LEGACY_TINY, dataclasses.asdict(config)):
        revived = Translator.from_config({"name": "nmt_moe", "trainable": True,
                                          "config": recorded})
        assert revived.config == config


# ------------------------------------------------------------------------ ops accounting

def ops_from_weights(model):
    """Multiply-adds per (source + target) token read off the weights: every matrix is
    used once per token, except that only k of the n experts run."""
    config, total = model.config, 0
    excluded = {id(w) for w in model.embedding.weights + model.softmax.weights}
    for weight in model.trainable_weights:
        name = weight.path.split("/")[-1]
        if id(weight) in excluded:
            continue
        if name in ("kernel", "recurrent_kernel", "U", "W", "V", "w_gate", "w_noise"):
            total += int(np.prod(weight.shape))
        elif name in ("kernel_in", "kernel_out"):
            total += int(np.prod(weight.shape)) * config.moe.k // config.moe.num_experts
    return total


@pytest.mark.parametrize("architecture,moe", [
    ("moe", dict(gating="balanced")),
    ("moe", dict(gating="top_k")),
    ("moe", dict(gating="top_k", noisy_gating=False)),
    ("dense", {}),
])
def test_ops_per_timestep_counts_every_matrix(architecture, moe):
    config = TranslationConfig(**{**TINY, "architecture": architecture,
                                  "moe": TINY_MOE.replace(hidden_size=64, **moe)})
    assert ops_per_timestep(config) == ops_from_weights(build_translator(config))


def test_ops_per_timestep_by_hand():
    d, a, n, k, h = 8, 6, 4, 2, 8
    lstm = 4 * d * (d + d)
    expected = (2 * 4 * (d // 2) * (d + d // 2) + 2 * lstm + d * a      # encoder
                + d * n + k * h * (d + d)                                # its balanced MoE
                + lstm + d * a + a + 4 * d * (2 * d + d)                 # decoder
                + 2 * d * n + k * h * (2 * d + d))                       # its MoE
    assert ops_per_timestep(TranslationConfig(**TINY)) == expected


def test_dense_model_matches_the_moe_models_ops():
    for hidden_size in (64, 256):
        moe = TranslationConfig(**{**TINY, "model_dim": 64, "attention_dim": 64,
                                   "moe": TINY_MOE.replace(hidden_size=hidden_size)})
        dense = dataclasses.replace(moe, architecture="dense")
        assert ops_per_timestep(dense) == pytest.approx(ops_per_timestep(moe), rel=0.02)
        # ... with far fewer parameters.
        assert (params_excluding_embedding_softmax(build_translator(dense))
                < params_excluding_embedding_softmax(build_translator(moe)))


# --------------------------------------------------------------------------- beam search

def log_softmax(logits):
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def scores(model, source, sequences, alpha):
    """log P(sequence | source) / ((5 + length) / 6)^alpha for each sequence, in NumPy."""
    length = max(len(s) for s in sequences)
    inputs = np.zeros((len(sequences), length), np.int32)
    for row, sequence in enumerate(sequences):
        inputs[row, :len(sequence)] = [BOS_ID] + list(sequence[:-1])
    logits = model((np.repeat(source[None], len(sequences), 0), inputs), training=False)
    log_probs = log_softmax(logits.numpy())
    return np.array([sum(log_probs[row, t, token] for t, token in enumerate(sequence))
                     / ((5.0 + len(sequence)) / 6.0) ** alpha
                     for row, sequence in enumerate(sequences)])


def greedy(model, source, max_length):
    """Greedy decoding in NumPy through the teacher-forced model."""
    sequence = []
    while len(sequence) < max_length and (not sequence or sequence[-1] != EOS_ID):
        inputs = np.array([[BOS_ID] + sequence], np.int32)
        logits = model((source[None], inputs), training=False).numpy()[0, -1]
        logits[[PAD_ID, BOS_ID]] = -np.inf
        sequence.append(int(np.argmax(logits)))
    return sequence


def next_token_log_probs(model, source, max_length):
    """{prefix: log P(next token | source, prefix)}, NumPy `[vocab]`, for every prefix of
    fewer than `max_length` tokens that the search can build (no padding or bos), read off
    the teacher-forced model in one batch: the Python reference asks for each many times.
    """
    tokens = [t for t in range(model.config.vocab_size) if t not in (PAD_ID, BOS_ID)]
    prefixes = [p for n in range(max_length) for p in itertools.product(tokens, repeat=n)]
    inputs = np.zeros((len(prefixes), max_length), np.int32)
    for row, prefix in enumerate(prefixes):
        inputs[row, :len(prefix) + 1] = [BOS_ID, *prefix]
    logits = model((np.repeat(source[None], len(prefixes), 0), inputs), training=False)
    log_probs = log_softmax(logits.numpy())
    return {prefix: log_probs[row, len(prefix)] for row, prefix in enumerate(prefixes)}


def trim(ids):
    return [int(t) for t in ids if t != PAD_ID]


SOURCES = np.array([[5, 6, 4, EOS_ID, 0, 0], [6, 4, 5, 1, 5, EOS_ID]], np.int32)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_beam_width_one_is_greedy_decoding(alpha):
    model = tiny_model(seed=1, softmax_scale=2.0)
    max_lengths = np.array([5, 8], np.int32)
    ids, _ = beam_search(model, tf.constant(SOURCES), beam_width=1,
                         length_penalty_alpha=alpha, max_lengths=max_lengths)
    for row in range(2):
        assert trim(ids[row]) == greedy(model, SOURCES[row], max_lengths[row])


def numpy_beam_search(log_probs, width, alpha, max_length):
    """The search `beam_search` documents, one hypothesis at a time in Python: slots of
    (tokens, log P, finished); each step ranks the finished slots and every extension of
    the live ones by log P / lp together and keeps the best `width`. `log_probs` from
    `next_token_log_probs(model, source, max_length)`."""
    def score(tokens, log_prob):
        return log_prob / ((5.0 + len(tokens)) / 6.0) ** alpha

    slots = [([], 0.0, False)]
    while not all(finished for _, _, finished in slots):
        candidates = []
        for tokens, log_prob, finished in slots:
            if finished:
                candidates.append((tokens, log_prob, True))
                continue
            for token, token_log_prob in enumerate(log_probs[tuple(tokens)]):
                if token not in (PAD_ID, BOS_ID):
                    candidates.append((tokens + [token], log_prob + token_log_prob,
                                       token == EOS_ID or len(tokens) + 1 >= max_length))
        candidates.sort(key=lambda c: -score(c[0], c[1]))
        slots = candidates[:width]
    tokens, log_prob, _ = max(slots, key=lambda c: score(c[0], c[1]))
    return tokens, score(tokens, log_prob)


# (seed, softmax scale, eos bias) of tiny models on which greedy decoding misses the best
# hypothesis, once by its first token and once by ending later than the best; on the
# third, ranking the hypotheses by log P instead of log P / lp keeps other ones.
HARD_MODELS = [(0, 1.0, 0.0), (4, 2.0, 0.0), (0, 2.0, 3.0)]
MAX_LENGTH = 4
HYPOTHESES = [list(prefix) + [EOS_ID] for n in range(MAX_LENGTH)
              for prefix in itertools.product([1, 4, 5, 6], repeat=n)] + [
    list(tokens) for tokens in itertools.product([1, 4, 5, 6], repeat=MAX_LENGTH)]


def search(model, width, alpha):
    ids, found = beam_search(model, tf.constant(SOURCES), beam_width=width,
                             length_penalty_alpha=alpha,
                             max_lengths=np.full([2], MAX_LENGTH, np.int32))
    return [trim(row) for row in ids.numpy()], found.numpy()


@pytest.mark.parametrize("alpha", [0.0, 1.0])
@pytest.mark.parametrize("seed,softmax_scale,eos_bias", HARD_MODELS[:2])
def test_beam_search_against_brute_force(seed, softmax_scale, eos_bias, alpha):
    model = tiny_model(seed=seed, softmax_scale=softmax_scale, eos_bias=eos_bias,
                       vocab_size=7)
    # Every hypothesis over the vocabulary {unk, eos, 4, 5, 6}: it ends at its first eos,
    # or is cut at MAX_LENGTH. A beam wider than all of them prunes nothing.
    assert len(HYPOTHESES) == 1 + 4 + 16 + 64 + 256
    exhaustive, exhaustive_scores = search(model, 512, alpha)
    greedy_ids, _ = search(model, 1, alpha)
    # Pruning is not monotone in the width: a beam of 2 can end below greedy decoding
    # (it does on the first model); 3 does not on these models.
    beam_ids, beam_scores = search(model, 3, alpha)
    greedy_gaps = []
    for row, source in enumerate(SOURCES):
        all_scores = scores(model, source, HYPOTHESES, alpha)
        best = int(np.argmax(all_scores))
        assert exhaustive[row] == HYPOTHESES[best]
        np.testing.assert_allclose(exhaustive_scores[row], all_scores[best], rtol=1e-5)
        greedy_score = all_scores[HYPOTHESES.index(greedy_ids[row])]
        greedy_gaps.append(all_scores[best] - greedy_score)
        # Beam search scores its result right, and finds at least greedy's score.
        beam_score = all_scores[HYPOTHESES.index(beam_ids[row])]
        np.testing.assert_allclose(beam_scores[row], beam_score, rtol=1e-5)
        assert beam_score >= greedy_score - 1e-9
    assert max(greedy_gaps) > 0.1  # the model is one where greedy decoding falls short


@pytest.mark.parametrize("block", [beam_search_module.TOP_K_BLOCK, 1])
@pytest.mark.parametrize("seed,softmax_scale,eos_bias", HARD_MODELS)
def test_beam_search_matches_a_python_reference(seed, softmax_scale, eos_bias, block,
                                                monkeypatch):
    # Block 1 takes the slots' candidates through top_k_by_blocks (7 tokens are too
    # few blocks of the default size).
    monkeypatch.setattr(beam_search_module, "TOP_K_BLOCK", block)
    model = tiny_model(seed=seed, softmax_scale=softmax_scale, eos_bias=eos_bias,
                       vocab_size=7)
    log_probs = [next_token_log_probs(model, source, MAX_LENGTH) for source in SOURCES]
    for width, alpha in itertools.product((2, 3), (0.0, 1.0, 3.0)):
        ids, found_scores = search(model, width, alpha)
        for row in range(len(SOURCES)):
            tokens, score = numpy_beam_search(log_probs[row], width, alpha, MAX_LENGTH)
            assert ids[row] == tokens, (width, alpha, row)
            np.testing.assert_allclose(found_scores[row], score, rtol=1e-5)


def test_beam_search_respects_each_sentences_max_length():
    model = tiny_model(seed=3)
    max_lengths = np.array([2, 6], np.int32)
    ids, _ = beam_search(model, tf.constant(SOURCES), beam_width=3,
                         length_penalty_alpha=0.6, max_lengths=max_lengths)
    for row in range(2):
        sequence = trim(ids[row])
        assert 1 <= len(sequence) <= max_lengths[row]
        assert EOS_ID not in sequence[:-1]
        assert not set(sequence) & {PAD_ID, BOS_ID}


@pytest.mark.parametrize("k", [1, 6, 8])
def test_top_k_by_blocks_matches_numpy_ties_included(k):
    rng = np.random.default_rng(k)
    values = np.round(rng.normal(size=[6, 1024]) * 2).astype(np.float32)  # many ties
    values[1] = 0.0                                  # a row of equal values
    values[2, :1000] = -np.inf                       # fewer finite values than blocks
    values[3, 5::128] = 9.0                          # the k largest in different blocks
    values[4, 256:262] = 9.0                         # ... and all in one block
    top, ids = top_k_by_blocks(tf.constant(values), k)
    expected_ids = np.argsort(-values, axis=1, kind="stable")[:, :k]
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_array_equal(top, np.take_along_axis(values, expected_ids, axis=1))
