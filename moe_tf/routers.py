"""The routing math of the routers that came after the paper, as pure functions.

`gating.py` is the paper's math; this module adds what Switch Transformer, ST-MoE and
dynamic ("top-p") routing define, for the gates of `router_gates.py` (and the router
z-loss, which every gate offers). Everything runs in float32 on `[tokens, n]` tensors.
"""

import tensorflow as tf


def router_z(logits: tf.Tensor) -> tf.Tensor:
    """ST-MoE's router z-loss term of each token, logsumexp(logits)^2 (the loss is its
    mean over the tokens that count).

    Args:
        logits: float32 `[..., n]`, the router's logits.

    Returns:
        float32 `[...]`.
    """
    return tf.square(tf.reduce_logsumexp(logits, axis=-1))


def switch_balancing_loss(probs: tf.Tensor, expert_counts: tf.Tensor,
                          token_weight: tf.Tensor) -> tf.Tensor:
    """The Switch Transformer's balancing loss without its weight: n * sum_i f_i P_i.

    f_i is expert i's share of the assignments (for top-1 routing: of the tokens), a
    count and so without gradient; P_i is the mean router probability of expert i over
    the tokens that count. Its minimum, 1, is a uniform spread.

    Args:
        probs: float32 `[tokens, n]`, softmax(x W_g).
        expert_counts: float32 `[n]`, the assignments each expert received.
        token_weight: float32 `[tokens]`, 1 for the tokens that count.
    """
    n = probs.shape[-1]
    fraction = tf.math.divide_no_nan(expert_counts, tf.reduce_sum(expert_counts))
    mean_prob = tf.math.divide_no_nan(
        tf.reduce_sum(probs * token_weight[:, None], axis=0), tf.reduce_sum(token_weight))
    return n * tf.reduce_sum(fraction * mean_prob)


def top_p_choices(probs: tf.Tensor, threshold: float, max_k: int):
    """Dynamic k ("top-p" routing, Huang et al. 2024): each token takes experts in order
    of probability until their probabilities sum to at least `threshold`, at most `max_k`.

    Args:
        probs: float32 `[tokens, n]`, softmax(x W_g).
        threshold: p in (0, 1].
        max_k: 1 <= max_k <= n.

    Returns:
        (index int32 `[tokens, max_k]`, gate float32 `[tokens, max_k]`): the experts by
        decreasing probability, and their probability where taken, 0 where not (the
        first is always taken). The gates are not renormalised: a token whose first
        expert is sure keeps that certainty as its weight.
    """
    top_probs, top_index = tf.math.top_k(probs, k=max_k)
    before = tf.cumsum(top_probs, axis=-1, exclusive=True)
    return top_index, tf.where(before < threshold, top_probs, 0.0)
