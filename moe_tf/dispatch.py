"""Sending tokens to their experts and combining the experts' outputs.

Both dispatchers take tokens `[tokens, d_in]`, a routing (see `routing.py`) and a
`FeedForwardExperts` layer, and return `sum_i G(x)_i E_i(x)`, `[tokens, d_out]`.
"""

import math

import tensorflow as tf


def sparse_dispatch(inputs, routing, experts):
    """Dropless dispatch: every assignment is computed, nothing of size tokens x experts.

    The active assignments are sorted by expert once; the experts run on contiguous
    blocks of the sorted rows, and a segment sum weighted by the gates brings the rows
    back to their tokens (its gradient is a gather, so the backward pass reuses the same
    permutation).
    """
    assignments = routing.assignments()
    order = tf.argsort(assignments.expert_index, stable=True)
    token_index = tf.gather(assignments.token_index, order)
    gate = tf.gather(assignments.gate, order)
    group_sizes = tf.math.bincount(assignments.expert_index,
                                   minlength=routing.num_experts,
                                   maxlength=routing.num_experts, dtype=tf.int32)
    outputs = experts(tf.gather(inputs, token_index), group_sizes=group_sizes)
    weighted = outputs * tf.cast(gate, outputs.dtype)[:, None]
    return tf.math.unsorted_segment_sum(weighted, token_index, tf.shape(inputs)[0])


def expert_capacity(num_tokens, assignments_per_token: int, num_experts: int,
                    capacity_factor: float):
    """Slots per expert: ceil(capacity_factor * tokens * assignments / experts), <= tokens.

    Static (a Python int) when `num_tokens` is; a scalar tensor otherwise.
    """
    if isinstance(num_tokens, int):
        wanted = math.ceil(capacity_factor * num_tokens * assignments_per_token
                           / num_experts)
        return max(1, min(num_tokens, wanted))
    wanted = tf.cast(tf.math.ceil(capacity_factor * tf.cast(num_tokens, tf.float32)
                                  * assignments_per_token / num_experts), tf.int32)
    return tf.maximum(1, tf.minimum(num_tokens, wanted))


def capacity_dispatch(inputs, routing, experts, *, capacity):
    """GShard-style fixed-capacity dispatch with one-hot einsums.

    Each expert gets a buffer of `capacity` rows, `[experts, capacity, d_in]`; assignments
    that do not fit are dropped (those tokens get no contribution from that expert).
    All shapes are static when the token count is, as XLA and DTensor want.
    """
    dispatch, combine = routing.capacity_masks(capacity)          # [T, E, C]
    expert_inputs = tf.einsum("tec,td->ecd", tf.cast(dispatch, inputs.dtype), inputs)
    outputs = experts(expert_inputs)                              # [E, C, d_out]
    return tf.einsum("tec,eco->to", tf.cast(combine, outputs.dtype), outputs)
