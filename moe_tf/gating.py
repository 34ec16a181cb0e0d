"""The gating math of the paper, as pure functions of tensors.

This module is the math; `gates.py` holds the Keras layers (the gates) that own the gate
weights and call it. "Group" in both means only the hierarchical layer's groups of
experts (Appendix B).

Shapes use `n` for the number of choices (experts, or groups at the primary level of a
hierarchical layer) and `...` for any leading token dimensions. Everything here runs in
float32: the layer casts its gating inputs up before calling in (mixed precision).
"""

import math
from typing import NamedTuple, Optional

import tensorflow as tf

# The authors' code adds this to the softplus so that the load estimator never divides by
# (almost) zero when the learned noise scale collapses.
DEFAULT_NOISE_EPSILON = 1e-2
# Guards the mean in the coefficient of variation.
CV_EPSILON = 1e-10


class TopKGating(NamedTuple):
    """The result of (noisy) top-k gating over `n` choices.

    Attributes:
        index: int32 `[..., k]`, the selected choices, best first.
        gate: float32 `[..., k]`, softmax over the selected logits (sums to 1).
        load: float32 `[..., n]`, each token's contribution to Load(X): the smooth
            probability P(x, i) of Eq. 9 while training with noise, otherwise the 0/1
            indicator of being selected.
    """

    index: tf.Tensor
    gate: tf.Tensor
    load: tf.Tensor


def normal_cdf(z: tf.Tensor) -> tf.Tensor:
    """Phi(z), the standard normal CDF; erfc keeps precision in the lower tail."""
    return 0.5 * tf.math.erfc(-z / math.sqrt(2.0))


def noise_stddev(raw_noise_logits: tf.Tensor,
                 epsilon: float = DEFAULT_NOISE_EPSILON) -> tf.Tensor:
    """softplus((x W_noise)_i) + epsilon, the per-choice noise scale of Eq. 4."""
    return tf.nn.softplus(raw_noise_logits) + epsilon


def _kth_excluding_from_top(values: tf.Tensor, top_values: tf.Tensor,
                            k: int) -> tf.Tensor:
    """kth_excluding given the k+1 largest entries of `values`, sorted descending."""
    threshold_if_in = top_values[..., k:k + 1]
    threshold_if_out = top_values[..., k - 1:k]
    # An entry strictly above the (k+1)-th largest is among the top k; ties at the
    # boundary give the same threshold either way.
    is_in = values > threshold_if_in
    return tf.where(is_in, threshold_if_in, threshold_if_out)


def top_k(values: tf.Tensor, k) -> tuple:
    """`tf.math.top_k(values, k)`, the values' gradient taken through a gather.

    The same values, indices and gradients; but under XLA, gradients through slices of
    top_k's own values (the gate's top k and its (k + 1)-th) make it a full sort of every
    row (254 against 7 ms on CPU for `[4096, 512]`, k = 5: a fifth of an E = 512 layer's
    step), where a selection alone stays XLA's TopK.

    Args:
        values: `[..., n]`, static rank.
        k: how many to keep.

    Returns:
        (`[..., k]` values, `[..., k]` int32 indices), largest first.
    """
    _, index = tf.math.top_k(tf.stop_gradient(values), k=k)
    return tf.gather(values, index, batch_dims=values.shape.rank - 1), index


def kth_excluding(values: tf.Tensor, k: int) -> tf.Tensor:
    """The k-th largest entry of `values[..., :]` leaving entry i out, for every i.

    For an i inside the top k that is the (k+1)-th largest entry, otherwise the k-th.

    Args:
        values: `[..., n]` with n > k.
        k: 1 <= k < n.

    Returns:
        `[..., n]`, same dtype as `values`.
    """
    n = values.shape[-1]
    if n is not None and not 1 <= k < n:
        raise ValueError(f"kth_excluding needs 1 <= k < n, got k={k}, n={n}.")
    top_values, _ = top_k(values, k + 1)
    return _kth_excluding_from_top(values, top_values, k)


def smooth_load(clean_logits: tf.Tensor, noisy_logits: tf.Tensor,
                stddev: tf.Tensor, k: int) -> tf.Tensor:
    """P(x, i) of Eq. 9: the probability that choice i stays in the top k under new noise.

    P(x, i) = Phi(((x W_g)_i - kth_excluding(H(x), k, i)) / stddev_i).

    Args:
        clean_logits: `[..., n]`, x W_g (no noise).
        noisy_logits: `[..., n]`, H(x).
        stddev: `[..., n]`, the noise scale (strictly positive).
        k: 1 <= k < n.

    Returns:
        `[..., n]` probabilities.
    """
    threshold = kth_excluding(noisy_logits, k)
    return normal_cdf((clean_logits - threshold) / stddev)


def noisy_top_k_gating(clean_logits: tf.Tensor, k: int, *,
                       noise: Optional[tf.Tensor] = None,
                       stddev: Optional[tf.Tensor] = None,
                       selection_bias: Optional[tf.Tensor] = None,
                       batch_sharded: bool = False) -> TopKGating:
    """G(x) = softmax(KeepTopK(H(x), k)), Eqs. 3-5, with each token's share of Load(X).

    Args:
        clean_logits: float32 `[..., n]`, x W_g.
        k: how many choices each token keeps, 1 <= k <= n.
        noise: standard normal samples `[..., n]`, only while training with noisy
            gating; None for plain top-k (evaluation, or `noisy_gating=False`).
        stddev: `[..., n]` noise scale (see `noise_stddev`), required with `noise`.
        selection_bias: `[n]`, added to the logits to choose the top k and nothing else:
            the gates are the softmax of the chosen experts' unbiased logits (the
            aux-loss-free balancing of DeepSeek-V3), and Load(X) is that of the biased
            choice. None: no bias.
        batch_sharded: the tokens are split across devices by DTensor. The gradient of
            `tf.math.top_k` scatters into the tokens with global indices, which DTensor
            cannot run on a shard; instead the selected logits are read with a one-hot
            contraction (same values and gradients, `[..., k + 1, n]` more memory).

    Returns:
        A `TopKGating`.
    """
    n = clean_logits.shape[-1]
    noisy = noise is not None
    if noisy and stddev is None:
        raise ValueError("noisy_top_k_gating: `stddev` is required with `noise`.")
    logits = clean_logits + noise * stddev if noisy else clean_logits
    if selection_bias is not None:
        clean_logits = clean_logits + selection_bias
        logits = logits + selection_bias
    if batch_sharded:
        _, top_index = tf.math.top_k(tf.stop_gradient(logits), k=min(k + 1, n))
        # Not an einsum: DTensor's einsum does not broadcast ("...").
        top_values = tf.reduce_sum(tf.one_hot(top_index, n, dtype=logits.dtype)
                                   * logits[..., None, :], axis=-1)
        index = top_index[..., :k]
    else:
        index = tf.math.top_k(tf.stop_gradient(logits), k=k).indices
        # With noise the k + 1 largest also serve the load estimator's threshold, from a
        # top_k call of their own: sliced from one call, XLA would sort every row in full
        # instead of running its TopK twice (see `top_k`).
        top_values = (top_k(logits, k + 1)[0] if noisy and k < n
                      else tf.gather(logits, index, batch_dims=logits.shape.rank - 1))
    chosen = top_values[..., :k]
    if selection_bias is not None:
        chosen -= tf.gather(selection_bias, index)
    gate = tf.nn.softmax(chosen, axis=-1)
    if noisy and k < n:
        threshold = _kth_excluding_from_top(logits, top_values, k)
        load = normal_cdf((clean_logits - threshold) / stddev)
    else:
        load = tf.reduce_sum(tf.one_hot(index, n, dtype=clean_logits.dtype), axis=-2)
    return TopKGating(index=index, gate=gate, load=load)


def cv_squared(values: tf.Tensor, epsilon: float = CV_EPSILON) -> tf.Tensor:
    """The squared coefficient of variation (population variance / mean^2) of a vector.

    A vector with one entry has no spread: returns 0.
    """
    values = tf.convert_to_tensor(values)
    if not values.dtype.is_floating:
        values = tf.cast(values, tf.float32)
    if values.shape[-1] == 1:
        return tf.zeros([], values.dtype)
    mean = tf.reduce_mean(values)
    variance = tf.reduce_mean(tf.square(values - mean))
    return variance / (tf.square(mean) + epsilon)


def balancing_loss(importance: tf.Tensor, load: tf.Tensor, *,
                   importance_weight: float, load_weight: float) -> tf.Tensor:
    """w_importance * CV(Importance)^2 + w_load * CV(Load)^2 (Eqs. 6-7 and 11)."""
    return (importance_weight * cv_squared(importance)
            + load_weight * cv_squared(load))


def batchwise_mask(scores: tf.Tensor, token_weight: tf.Tensor, k: int) -> tf.Tensor:
    """M_batchwise (Appendix F): each expert takes the m tokens of its group with the
    largest scores, m = ceil(k |X| / n), |X| the group's tokens that count.

    Ties go to earlier tokens, as in `tf.math.top_k`. Each expert's m-th best (score,
    token) is found by a top-k over its column and the mask is a comparison with it (no
    scatter of the top-k's indices, which DTensor cannot run on a split batch).

    Args:
        scores: float32 `[*groups, tokens, n]` in [0, 1] (softmax probabilities); `groups`
            may be empty (the batch is one group).
        token_weight: float32 `[*groups, tokens]`, 1 for the tokens that count, 0 for
            masked ones (never picked, and not in |X|).
        k: the mean choices per token.

    Returns:
        float32 `[*groups, tokens, n]`, 1 where a token is among its expert's top m.
    """
    n = scores.shape[-1]
    num_valid = tf.reduce_sum(token_weight, axis=-1)                        # [*G]
    m = tf.cast(tf.math.ceil(k * num_valid / n), tf.int32)
    m = tf.minimum(m, tf.cast(num_valid, tf.int32))
    # Masked tokens score below every probability, so they are never picked.
    scores = tf.where(tf.expand_dims(token_weight, -1) > 0, scores, -1.0)
    rank = scores.shape.rank
    by_expert = tf.transpose(scores, list(range(rank - 2)) + [rank - 1, rank - 2])
    num_tokens = tf.shape(scores)[-2]
    top_values, top_tokens = tf.math.top_k(
        by_expert, k=tf.minimum(tf.maximum(tf.reduce_max(m), 1), num_tokens))  # [*G, n, M]
    # Each group's m-th; above every score (and no token) for a group without tokens.
    last = tf.broadcast_to(tf.expand_dims(tf.maximum(m - 1, 0), -1),
                           tf.shape(top_values)[:-1])
    pad = tf.concat([tf.shape(top_values)[:-1], [1]], axis=0)
    last_value = tf.gather(tf.concat([top_values, tf.fill(pad, 2.0)], axis=-1), last,
                           axis=rank - 1, batch_dims=rank - 1)                  # [*G, n]
    last_token = tf.gather(tf.concat([top_tokens, tf.fill(pad, -1)], axis=-1), last,
                           axis=rank - 1, batch_dims=rank - 1)
    token = tf.range(num_tokens)[:, None]
    last_value, last_token = tf.expand_dims(last_value, -2), tf.expand_dims(last_token, -2)
    picked = (scores > last_value) | ((scores == last_value) & (token <= last_token))
    has_tokens = tf.expand_dims(tf.expand_dims(m > 0, -1), -1)
    return tf.cast(picked & has_tokens, tf.float32)
