"""The language model's export, in process: stateful generation (the LSTMs' state, the
Transformers' key/value cache) equals recomputing the whole prefix for every token (the
fresh-process checks are in tests/test_lm.py)."""

import gzip
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from models.lm import (LanguageModelConfig, build_language_model, initial_state,
                       language_model_step)
from models.special_tokens import BOS_ID, EOS_ID
from moe_tf import MoEConfig
from train.data.tokenizer import SubwordTokenizer
from train.serving.lm import LanguageModelServer, sample_next

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["In the beginning", "And God said unto Moses, Go", ""]


@pytest.fixture(scope="module")
def vocabulary():
    with gzip.open(os.path.join(ROOT, "train/data/bible/en.train.txt.gz"), "rt") as f:
        lines = f.read().splitlines()[:400]
    return SubwordTokenizer.train(lines, vocab_size=120).model_proto


@pytest.fixture
def tokenizer(vocabulary):
    # Seeded first: setting TensorFlow's seed clears the kernels that hold the
    # tokenizer's resource.
    keras.utils.set_random_seed(1)
    return SubwordTokenizer(vocabulary)


def make_server(architecture, tokenizer, **moe_settings):
    config = LanguageModelConfig(
        architecture=architecture, vocab_size=tokenizer.vocab_size, model_dim=16,
        moe=MoEConfig(num_experts=4, k=2, hidden_size=8, **moe_settings), dropout=0.0,
        num_layers=2, num_heads=2)
    model = build_language_model(config)
    rng = np.random.default_rng(0)
    for weight in model.weights:  # far from the initial near-uniform predictions
        weight.assign(rng.normal(0.0, 0.5, weight.shape).astype(np.float32))
    return LanguageModelServer(model, config, tokenizer, max_length=24)


def log_softmax(logits):
    """NumPy log-probabilities over the last axis, in float64."""
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def prompt_ids(tokenizer):
    """int32 ragged `[prompts, (n)]`: begin-of-sentence and each prompt's ids."""
    pieces = tokenizer.tokenize(tf.constant(PROMPTS))
    return tf.concat([tf.fill([len(PROMPTS), 1], BOS_ID), pieces], axis=1)


def last_logits_of_whole_prefixes(model, rows):
    """`[batch, vocab]`: the model run over each row's prefix alone (`rows`: lists of
    ids), without padding (the reference the read prompts and stepped state must
    reproduce)."""
    return tf.concat([model(tf.constant([row]), training=False)[:, -1] for row in rows],
                     axis=0)


def generated_by_recomputing(server, ids, max_new_tokens, temperature, seed):
    """The reference: every token from the model run over the whole prefix, as the
    export generated before it carried the state."""
    rows = ids.to_list()
    ended = np.zeros(len(rows), bool)
    new = []
    for i in range(max_new_tokens):
        logits = last_logits_of_whole_prefixes(server.model, rows)
        next_ids = np.where(ended, 0, sample_next(logits, temperature, seed, i).numpy())
        ended |= next_ids == EOS_ID
        new.append(next_ids)
        rows = [row + [int(id_)] * (not done) for row, id_, done in zip(rows, next_ids, ended)]
        if ended.all():
            break
    return np.stack(new, axis=1)


# The LSTM models read prompts packed; with the capacity dispatch (drops depend on the
# order of a call's tokens), and for a Transformer, position by position.
SERVED_MODELS = {"moe": {}, "4xlstm": {}, "moe-1-deep": {}, "transformer-moe": {},
                 "moe, capacity": dict(dispatch="capacity", capacity_factor=4.0)}


@pytest.mark.parametrize("served", list(SERVED_MODELS))
def test_read_prompts_give_the_logits_of_the_whole_prefix(served, tokenizer):
    server = make_server(served.split(",")[0], tokenizer, **SERVED_MODELS[served])
    assert server.packs == (served in ("moe", "4xlstm", "moe-1-deep"))
    ids = prompt_ids(tokenizer)
    logits, _ = server.read_prompts(ids)
    expected = last_logits_of_whole_prefixes(server.model, ids.to_list())
    assert float(tf.reduce_max(tf.abs(expected))) > 1.0
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("served", ["moe", "transformer-moe", "moe, capacity"])
def test_generate_with_state_equals_recomputing_the_prefix(served, tokenizer):
    server = make_server(served.split(",")[0], tokenizer, **SERVED_MODELS[served])
    ids = prompt_ids(tokenizer)
    want = generated_by_recomputing(server, ids, max_new_tokens=12, temperature=1.0,
                                    seed=7)
    got = server.generate(tf.constant(PROMPTS), tf.constant(12), tf.constant(1.0),
                          tf.constant(7))["text"].numpy()
    expected = tokenizer.detokenize(tf.ragged.boolean_mask(want, want > EOS_ID)).numpy()
    assert got.tolist() == expected.tolist()
    assert len(set(got.tolist())) == len(PROMPTS)  # three different continuations
    # The first row alone continues as it does in the batch.
    alone = server.generate(tf.constant(PROMPTS[:1]), tf.constant(12), tf.constant(1.0),
                            tf.constant(7))["text"].numpy()
    assert alone.tolist() == got[:1].tolist()


@pytest.mark.parametrize("architecture", ["moe", "transformer-moe"])
def test_generate_answers_an_empty_batch_and_no_new_tokens(architecture, tokenizer):
    server = make_server(architecture, tokenizer)
    args = (tf.constant(1.0), tf.constant(7))
    empty = server.generate(tf.constant([], tf.string), tf.constant(5), *args)
    assert empty["text"].shape == empty["num_tokens"].shape == (0,)
    nothing = server.generate(tf.constant(PROMPTS), tf.constant(0), *args)
    assert nothing["text"].numpy().tolist() == [b""] * len(PROMPTS)
    assert nothing["num_tokens"].numpy().tolist() == [0] * len(PROMPTS)


def test_padding_keeps_the_state(tokenizer):
    server = make_server("moe", tokenizer)
    state = initial_state(server.model, server.config, 2, 1)
    _, after_token = language_model_step(server.model, server.config,
                                         tf.constant([5, 0]), state)
    np.testing.assert_array_equal(after_token["lstm_1"][0][1], 0.0)
    assert float(tf.reduce_max(tf.abs(after_token["lstm_1"][0][0]))) > 0


def test_transformer_padding_rows_stay_unread(tokenizer):
    """A padding id neither advances a row's position nor becomes a readable slot."""
    server = make_server("transformer-moe", tokenizer)
    state = initial_state(server.model, server.config, 2, 3)
    _, state = language_model_step(server.model, server.config, tf.constant([5, 0]), state)
    np.testing.assert_array_equal(state["position"], [1, 0])
    np.testing.assert_array_equal(state["readable"], [[True, False, False],
                                                      [False, False, False]])
    assert int(state["slot"]) == 1


@pytest.mark.parametrize("architecture", ["moe", "4xlstm", "moe-1-deep",
                                          "transformer-moe"])
def test_scoring_a_batch_equals_each_sentence_alone(architecture, tokenizer):
    """A batch of 80 sentences of mixed lengths (empty and cut ones included) gives every
    sentence the log-probability of the model run over that sentence alone (the LSTM
    models score packed, the Transformers padded)."""
    server = make_server(architecture, tokenizer)
    words = "and the LORD spake unto Moses saying of the children of Israel".split()
    rng = np.random.default_rng(3)
    sentences = [" ".join(rng.choice(words, size=rng.integers(0, 12)))
                 for _ in range(80)]
    scored = server.score(tf.constant(sentences))
    ids = tf.concat([tf.fill([len(sentences), 1], BOS_ID), tokenizer.tokenize(
        tf.constant(sentences)), tf.fill([len(sentences), 1], EOS_ID)], axis=1)
    # One trace for every length (eager LSTMs over 80 shapes take seconds each).
    run_alone = tf.function(lambda ids: server.model(ids, training=False),
                            input_signature=[tf.TensorSpec([1, None], tf.int32)])
    for i, row in enumerate(ids.to_list()):
        row = row[:server.max_length + 1]  # a long sentence is cut (training's cut)
        log_p = log_softmax(run_alone(tf.constant([row[:-1]]))[0].numpy())
        want = sum(log_p[t, token] for t, token in enumerate(row[1:]))
        np.testing.assert_allclose(scored["log_prob"][i], want, rtol=1e-5, atol=1e-4)
        assert scored["num_tokens"][i] == len(row) - 1


def test_capacity_dispatch_scores_as_the_padded_batch(tokenizer):
    """The capacity dispatch's drops depend on the order of a call's tokens, so such a
    model scores a batch padded, as the model runs it in training, not packed."""
    server = make_server("moe", tokenizer, dispatch="capacity", capacity_factor=0.5)
    assert server.config.moe.depends_on_token_order
    sentences = ["and the LORD spake unto Moses", "of the children of Israel", "",
                 "saying unto the children and the LORD"]
    scored = server.score(tf.constant(sentences))["log_prob"].numpy()
    ids = tf.concat([tf.fill([len(sentences), 1], BOS_ID),
                     tokenizer.tokenize(tf.constant(sentences)),
                     tf.fill([len(sentences), 1], EOS_ID)], axis=1)
    rows = ids.to_tensor(0).numpy()[:, :server.max_length + 1]  # training's cut
    # As training runs the batch: a shorter row's eos is an input too (its target is
    # padding), and takes its share of the experts' slots.
    log_p = log_softmax(server.model(tf.constant(rows[:, :-1]), training=False).numpy())
    want = [sum(log_p[i, t, token] for t, token in enumerate(row[1:]) if token)
            for i, row in enumerate(rows)]
    np.testing.assert_allclose(scored, want, rtol=1e-5)
