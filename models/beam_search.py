"""Beam search with GNMT's length normalisation, over a `models.translator.Translator`."""

from typing import Tuple

import tensorflow as tf

from models.special_tokens import BOS_ID, EOS_ID, PAD_ID

# GNMT's length normalisation, lp(Y) = ((LENGTH_PENALTY_BASE + |Y|) / (BASE + 1))^alpha.
LENGTH_PENALTY_BASE = 5.0


def length_penalty(lengths, alpha: float):
    """GNMT's lp(Y) = ((5 + |Y|) / 6)^alpha; scores are log P(Y) / lp(Y)."""
    return tf.pow((LENGTH_PENALTY_BASE + tf.cast(lengths, tf.float32))
                  / (LENGTH_PENALTY_BASE + 1.0), alpha)


def beam_search(model, source, *, beam_width: int, length_penalty_alpha: float,
                max_lengths) -> Tuple[tf.Tensor, tf.Tensor]:
    """The best translation of each source under log P(Y | X) / lp(Y), by beam search.

    Args:
        model: a Translator.
        source: int32 `[batch, source]`, 0-padded.
        beam_width: hypotheses kept per sentence; 1 is greedy decoding.
        length_penalty_alpha: alpha of `length_penalty`; 0 ranks by log P alone.
        max_lengths: int32 `[batch]`: a hypothesis that reaches this many tokens without
            end-of-sentence ends there.

    Returns:
        ids int32 `[batch, length]` (ending with EOS unless cut, then 0-padded) and their
        scores float32 `[batch]`.

    Each of the `beam_width` slots holds a hypothesis; a finished one (EOS, or its
    sentence's max length) stays in its slot with its score, competing with the
    extensions of the live ones (whose tokens are all ranked together by their scores),
    until every slot has finished. With beam_width 1 this is greedy decoding. Padding and
    begin-of-sentence are never generated.
    """
    batch = tf.shape(source)[0]
    beams = beam_width
    vocab = model.config.vocab_size
    encoded = tf.nest.map_structure(lambda x: tf.repeat(x, beams, axis=0),  # [B * K, ...]
                                    model.encode(source, training=False))
    max_lengths = tf.cast(max_lengths, tf.int32)
    next_log_probs = _next_token_log_probs(model, encoded, batch=batch, beams=beams)
    initial = _initial_hypotheses(model, batch=batch, beams=beams)

    def not_done(sequences, log_probs, lengths, finished, last, state):
        return tf.logical_not(tf.reduce_all(finished))

    def step(sequences, log_probs, lengths, finished, last, state):
        step_log_probs, state = next_log_probs(last, state, finished)       # [B, K, V]
        slot, token, log_probs, lengths = _best_extensions(
            log_probs[:, :, None] + step_log_probs,
            lengths + tf.cast(tf.logical_not(finished), tf.int32), length_penalty_alpha,
            beams=beams, vocab=vocab)
        finished = tf.logical_or(tf.gather(finished, slot, batch_dims=1), tf.logical_or(
            tf.equal(token, EOS_ID), lengths >= max_lengths[:, None]))
        # A slot that only -inf candidates could fill is dead: never a result.
        finished = tf.logical_or(finished, tf.math.is_inf(log_probs))
        sequences = tf.concat([tf.gather(sequences, slot, batch_dims=1),
                               token[:, :, None]], axis=2)
        rows = tf.reshape(slot + tf.range(batch)[:, None] * beams, [-1])
        state = tf.nest.map_structure(lambda s: tf.gather(s, rows), state)
        return sequences, log_probs, lengths, finished, tf.reshape(token, [-1]), state

    invariants = (tf.TensorShape([None, beams, None]),) + tuple(
        tf.nest.map_structure(lambda t: tf.TensorShape(t.shape), initial[1:]))
    sequences, log_probs, lengths, _, _, _ = tf.while_loop(
        not_done, step, initial, shape_invariants=invariants)
    scores = log_probs / length_penalty(lengths, length_penalty_alpha)
    best = tf.argmax(scores, axis=1, output_type=tf.int32)
    return (tf.gather(sequences, best, batch_dims=1),
            tf.gather(scores, best, batch_dims=1))


def _initial_hypotheses(model, *, batch, beams: int):
    """The search's loop variables before the first step: tokens `[B, K, 0]`, log P
    `[B, K]`, lengths `[B, K]`, finished `[B, K]`, last tokens `[B * K]` (bos) and the
    decoder state. Only the first slot is live, so the first step fills distinct slots."""
    log_probs = tf.tile(tf.concat([[0.0], tf.fill([beams - 1], -float("inf"))], 0)[None],
                        [batch, 1])
    return (tf.zeros([batch, beams, 0], tf.int32), log_probs,
            tf.zeros([batch, beams], tf.int32), tf.zeros([batch, beams], tf.bool),
            tf.fill([batch * beams], BOS_ID), model.initial_decoder_state(batch * beams))


def _next_token_log_probs(model, encoded, *, batch, beams: int):
    """`(last tokens [B * K], state, finished [B, K]) -> (log P of each next token
    [B, K, V], next state)`: padding and bos are never generated, and the only
    continuation of a finished slot is padding, at no cost."""
    vocab = model.config.vocab_size
    ids = tf.range(vocab)
    never = tf.logical_or(tf.equal(ids, PAD_ID), tf.equal(ids, BOS_ID))
    finished_row = tf.where(tf.equal(ids, PAD_ID), 0.0, -float("inf"))

    def next_log_probs(last, state, finished):
        logits, state = model.decode_step(last, state, encoded)
        step_log_probs = tf.where(never, -float("inf"), tf.nn.log_softmax(logits))
        step_log_probs = tf.reshape(step_log_probs, [batch, beams, vocab])
        return tf.where(finished[:, :, None], finished_row, step_log_probs), state

    return next_log_probs


def _best_extensions(candidates, lengths, length_penalty_alpha: float, *, beams: int,
                     vocab: int):
    """The `beams` best of all slots' candidates (log P `[B, K, V]`, of lengths `[B, K]`)
    under log P / lp: the slot each extends, its token, log P and length, all `[B, K]`."""
    batch = tf.shape(candidates)[0]
    scores = candidates / length_penalty(lengths, length_penalty_alpha)[:, :, None]
    _, top = tf.math.top_k(tf.reshape(scores, [batch, beams * vocab]), k=beams)
    slot, token = top // vocab, top % vocab                                  # [B, K]
    log_probs = tf.gather(tf.reshape(candidates, [batch, beams * vocab]), top,
                          batch_dims=1)
    return slot, token, log_probs, tf.gather(lengths, slot, batch_dims=1)
