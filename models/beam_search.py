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
    next_candidates = _next_token_candidates(model, beams=beams)

    def step(steps, found, sentences, max_lengths, encoded, sequences, log_probs, lengths,
             finished, last, state):
        tokens, token_log_probs, state = next_candidates(last, state, finished,
                                                         encoded)             # [S, K, C]
        slot, token, log_probs, lengths = _best_extensions(
            log_probs[:, :, None] + token_log_probs, tokens,
            lengths + tf.cast(tf.logical_not(finished), tf.int32), length_penalty_alpha,
            beams=beams)
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


def _next_token_candidates(model, *, beams: int):
    """`(last tokens [S * K], state, finished [S, K], encoded) -> (each slot's best next
    tokens [S, K, C], their log P [S, K, C], next state)`.

    Only a slot's K best continuations can be among the K best of all slots, so each
    slot offers C = min(K + 2, V): its K best and two more for padding and bos, which are
    never generated (-inf). A finished slot offers padding only, at no cost. Ranking K + 2
    tokens per slot rather than all V of every slot (and normalising only those) spares
    the search most of its passes over `[S * K, V]`.
    """
    vocab = model.config.vocab_size
    candidates = min(beams + 2, vocab)
    finished_tokens = tf.constant([PAD_ID] * candidates)
    finished_log_probs = tf.constant([0.0] + [-float("inf")] * (candidates - 1))

    def next_candidates(last, state, finished, encoded):
        logits, state = model.decode_step(last, state, encoded)               # [S * K, V]
        top_logits, tokens = top_k_by_blocks(logits, candidates)
        # log P as tf.nn.log_softmax computes it: (logit - max) - log sum exp(. - max).
        most = top_logits[:, :1]
        log_probs = (top_logits - most) - tf.math.log(
            tf.reduce_sum(tf.exp(logits - most), axis=-1, keepdims=True))
        never = tf.logical_or(tf.equal(tokens, PAD_ID), tf.equal(tokens, BOS_ID))
        log_probs = tf.reshape(tf.where(never, -float("inf"), log_probs),
                               [-1, beams, candidates])
        tokens = tf.reshape(tokens, [-1, beams, candidates])
        ended = finished[:, :, None]
        return (tf.where(ended, finished_tokens, tokens),
                tf.where(ended, finished_log_probs, log_probs), state)

    return next_candidates


def _best_extensions(candidates, tokens, lengths, length_penalty_alpha: float, *,
                     beams: int):
    """The `beams` best of all slots' candidates (log P `[B, K, C]` of the tokens
    `[B, K, C]`, each slot's of length `[B, K]`) under log P / lp: the slot each extends,
    its token, log P and length, all `[B, K]`. Ties go to the lower slot, then to the
    candidate ranked first (the lower token among equal log P)."""
    batch = tf.shape(candidates)[0]
    offered = candidates.shape[-1]
    scores = candidates / length_penalty(lengths, length_penalty_alpha)[:, :, None]
    _, top = tf.math.top_k(tf.reshape(scores, [batch, beams * offered]), k=beams)
    slot = top // offered                                                     # [B, K]
    flat = lambda t: tf.reshape(t, [batch, beams * offered])
    return (slot, tf.gather(flat(tokens), top, batch_dims=1),
            tf.gather(flat(candidates), top, batch_dims=1),
            tf.gather(lengths, slot, batch_dims=1))


# Elements per block of `top_k_by_blocks`.
TOP_K_BLOCK = 128


def top_k_by_blocks(values, k: int):
    """`tf.math.top_k(values, k)` of `[rows, n]` (static n), ties included (the lower
    index first), found among the k blocks of `TOP_K_BLOCK` elements with the largest
    maxima: a block holding one of the k largest elements is among them. TensorFlow's CPU
    top-k takes about 2 ns an element for a small k (9.5 ms for `[512, 8192]`); one max
    per block and a top-k over k blocks' elements take a fraction of that. Falls back to
    `tf.math.top_k` where n is not a multiple of the block or has fewer than k blocks."""
    n = values.shape[-1]
    if n is None or n % TOP_K_BLOCK or n // TOP_K_BLOCK < k:
        return tf.math.top_k(values, k=k)
    blocks = tf.reshape(values, [-1, n // TOP_K_BLOCK, TOP_K_BLOCK])
    _, chosen = tf.math.top_k(tf.reduce_max(blocks, axis=-1), k=k)          # [rows, k]
    chosen = tf.sort(chosen, axis=-1)  # by index, so that ties go to the lower index
    top, at = tf.math.top_k(tf.reshape(tf.gather(blocks, chosen, batch_dims=1),
                                       [-1, k * TOP_K_BLOCK]), k=k)
    return top, tf.gather(chosen, at // TOP_K_BLOCK, batch_dims=1) * TOP_K_BLOCK + (
        at % TOP_K_BLOCK)
