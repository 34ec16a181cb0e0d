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
    begin-of-sentence are never generated. A sentence whose slots have all finished
    leaves the search: later steps decode only the sentences still searching, so a batch
    costs the sum of its sentences' lengths rather than its longest times its size.
    """
    batch = tf.shape(source)[0]
    beams = beam_width
    max_lengths = tf.cast(max_lengths, tf.int32)
    longest = tf.reduce_max(tf.concat([max_lengths, [0]], 0))
    encoded = tf.nest.map_structure(lambda x: tf.repeat(x, beams, axis=0),  # [B * K, ...]
                                    model.encode(source, training=False))
    searching = (tf.range(batch), max_lengths, encoded,
                 *_initial_hypotheses(model, batch=batch, beams=beams))
    found = (tf.zeros([batch, longest], tf.int32), tf.zeros([batch], tf.float32))
    step = _search_step(model, beams=beams, length_penalty_alpha=length_penalty_alpha,
                        longest=longest)
    unknown_batch = lambda t: tf.TensorShape([None]).concatenate(t.shape[1:])
    invariants = (tf.TensorShape([]), tf.nest.map_structure(lambda t: t.shape, found),
                  *tf.nest.map_structure(unknown_batch, searching[:3]),
                  tf.TensorShape([None, beams, None]),
                  *tf.nest.map_structure(unknown_batch, searching[4:]))
    steps, (ids, scores), *_ = tf.while_loop(
        lambda steps, found, sentences, *_: tf.size(sentences) > 0,
        step, (tf.constant(0), found, *searching), shape_invariants=invariants)
    return ids[:, :steps], scores


def _search_step(model, *, beams: int, length_penalty_alpha: float, longest):
    """The search's loop body: one token for every sentence still searching; sentences
    whose slots have all finished write their best hypothesis into `found` and leave."""
    vocab = model.config.vocab_size
    next_log_probs = _next_token_log_probs(model, beams=beams)

    def step(steps, found, sentences, max_lengths, encoded, sequences, log_probs, lengths,
             finished, last, state):
        step_log_probs, state = next_log_probs(last, state, finished, encoded)  # [S, K, V]
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
        done = tf.reduce_all(finished, axis=1)                                 # [S]
        found = _write_found(found, tf.boolean_mask(sentences, done),
                             tf.boolean_mask(sequences, done),
                             tf.boolean_mask(log_probs / length_penalty(
                                 lengths, length_penalty_alpha), done), longest)
        keep = tf.where(tf.logical_not(done))[:, 0]
        slot_rows = slot + tf.range(tf.shape(slot)[0])[:, None] * beams     # [S, K]
        rows = tf.reshape(tf.gather(slot_rows, keep), [-1])
        kept_rows = tf.reshape(keep[:, None] * beams + tf.range(beams, dtype=tf.int64),
                               [-1])
        return (steps + 1, found, tf.gather(sentences, keep), tf.gather(max_lengths, keep),
                tf.nest.map_structure(lambda e: tf.gather(e, kept_rows), encoded),
                tf.gather(sequences, keep), tf.gather(log_probs, keep),
                tf.gather(lengths, keep), tf.gather(finished, keep),
                tf.gather(tf.reshape(token, [-1]), kept_rows),
                tf.nest.map_structure(lambda s: tf.gather(s, rows), state))

    return step


def _write_found(found, sentences, sequences, scores, longest):
    """Writes the best of each finished sentence's hypotheses (`sequences` `[F, K, t]`,
    `scores` `[F, K]`) into `found` (ids `[batch, longest]`, scores `[batch]`) at
    `sentences` `[F]`."""
    best = tf.argmax(scores, axis=1, output_type=tf.int32)
    ids = tf.gather(sequences, best, batch_dims=1)                           # [F, t]
    ids = tf.pad(ids, [[0, 0], [0, longest - tf.shape(ids)[1]]])
    at = sentences[:, None]
    return (tf.tensor_scatter_nd_update(found[0], at, ids),
            tf.tensor_scatter_nd_update(found[1], at, tf.gather(scores, best,
                                                                batch_dims=1)))


def _initial_hypotheses(model, *, batch, beams: int):
    """The search's loop variables before the first step: tokens `[B, K, 0]`, log P
    `[B, K]`, lengths `[B, K]`, finished `[B, K]`, last tokens `[B * K]` (bos) and the
    decoder state. Only the first slot is live, so the first step fills distinct slots."""
    log_probs = tf.tile(tf.concat([[0.0], tf.fill([beams - 1], -float("inf"))], 0)[None],
                        [batch, 1])
    return (tf.zeros([batch, beams, 0], tf.int32), log_probs,
            tf.zeros([batch, beams], tf.int32), tf.zeros([batch, beams], tf.bool),
            tf.fill([batch * beams], BOS_ID), model.initial_decoder_state(batch * beams))


def _next_token_log_probs(model, *, beams: int):
    """`(last tokens [S * K], state, finished [S, K], encoded) -> (log P of each next
    token [S, K, V], next state)`: padding and bos are never generated, and the only
    continuation of a finished slot is padding, at no cost."""
    vocab = model.config.vocab_size
    ids = tf.range(vocab)
    never = tf.logical_or(tf.equal(ids, PAD_ID), tf.equal(ids, BOS_ID))
    finished_row = tf.where(tf.equal(ids, PAD_ID), 0.0, -float("inf"))

    def next_log_probs(last, state, finished, encoded):
        logits, state = model.decode_step(last, state, encoded)
        step_log_probs = tf.where(never, -float("inf"), tf.nn.log_softmax(logits))
        step_log_probs = tf.reshape(step_log_probs, [-1, beams, vocab])
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
