"""Sending tokens to their experts and combining the experts' outputs.

Both dispatchers take tokens `[tokens, d_in]`, a routing (see `routing.py`) and a
`FeedForwardExperts` layer, and return `sum_i G(x)_i E_i(x)`, `[tokens, d_out]`.
"""

import functools
import math
from typing import NamedTuple, Optional, Union

import tensorflow as tf

from moe_tf import kernels
from moe_tf.routing import split_into_token_groups


class _SortedAssignments(NamedTuple):
    """The assignments sorted by expert (stably, unused ones last): the permutation the
    sparse dispatch moves rows by, both ways.

    Attributes:
        routing: the routing the assignments are of.
        order: int32 `[assignments]`, the assignment at each sorted position.
        inverse: int32 `[assignments]`, the sorted position of each assignment.
        sorted_tokens: int32 `[assignments]`, the token at each sorted position.
        ops: the compiled kernels' op library, or None for TensorFlow ops.
        offsets: int32 `[tokens + 1]`, `routing.token_offsets()` (with `ops` only).
    """

    routing: object
    order: tf.Tensor
    inverse: tf.Tensor
    sorted_tokens: tf.Tensor
    ops: object
    offsets: Optional[tf.Tensor]

    def sum_per_token(self, rows, weights=None):
        """Sorted rows `[assignments, d]` -> `[tokens, d]`: each token's sum of its rows,
        times `weights` (`[assignments]`, assignment order) when given."""
        if self.ops is not None:
            return self.ops.moe_weighted_row_sum(
                rows, self.inverse,
                tf.zeros([0], rows.dtype) if weights is None else weights, self.offsets)
        rows = tf.gather(rows, self.inverse)
        return self.routing.sum_per_token(
            rows if weights is None else rows * weights[:, None])

    def dispatch(self, inputs):
        """`[tokens, d_in]` -> `[assignments, d_in]`: each assignment's token, sorted."""
        @tf.custom_gradient
        def gather_tokens(inputs):
            # The gradient: each token's sum of its rows' gradients.
            return tf.gather(inputs, self.sorted_tokens), self.sum_per_token

        return gather_tokens(inputs)

    def combine(self, rows, gate):
        """Sorted outputs `[assignments, d_out]` and gates `[assignments]` (assignment
        order) -> `[tokens, d_out]`, each token's sum of gate * row."""
        @tf.custom_gradient
        def weighted_sum(rows, gate):
            weights = tf.cast(gate, rows.dtype)
            return (self.sum_per_token(rows, weights),
                    functools.partial(self._combine_grad, rows, gate.dtype, weights))

        return weighted_sum(rows, gate)

    def _combine_grad(self, rows, gate_dtype, weights, d_outputs):
        """The gradients of `combine` for `d_outputs` `[tokens, d_out]`: of the sorted
        rows and of the gates."""
        if self.ops is not None:
            d_rows, d_gate = self.ops.moe_weighted_row_sum_grad(
                rows, self.inverse, weights, self.offsets, d_outputs)
            return d_rows, tf.cast(d_gate, gate_dtype)
        d_rows = tf.gather(d_outputs, self.sorted_tokens)
        d_gate = tf.gather(tf.reduce_sum(d_rows * rows, axis=-1), self.inverse)
        # Ordered so that `rows` is freed before the experts' backward pass starts.
        with tf.control_dependencies([d_gate]):
            d_rows = d_rows * tf.gather(weights, self.order)[:, None]
        return d_rows, tf.cast(d_gate, gate_dtype)


def sparse_dispatch(inputs, routing, experts, *,
                    compiled_kernels: Union[str, bool] = False):
    """Dropless dispatch: every assignment is computed, nothing of size tokens x experts.

    The assignments are sorted by expert once (unused ones last); the experts run on
    contiguous blocks of the sorted rows, and the inverse permutation brings their outputs
    back to assignment order for the gate-weighted sum per token. The gradients are
    written by hand so that the backward pass reuses both permutations
    (`_SortedAssignments`): every data movement is a gather (TensorFlow's gradient of a
    gather is a scatter-add, slower on CPU), and no forward tensor outlives its last use.

    With `compiled_kernels` "auto" or True (the layer passes False outside training
    calls) and float32 tokens, the per-token sums (the combine, and the dispatch's
    gradient) and the combine's gradient run as the compiled ops of `moe_tf.kernels` when
    they are built (True: a ValueError where they cannot run): one pass over the rows
    each, in place of a gather, multiplies and a sum with their `[assignments, d]`
    temporaries.
    """
    assignments = routing.assignments()
    order = tf.argsort(assignments.expert_index, stable=True)
    inverse = tf.math.invert_permutation(order)
    sorted_tokens = tf.gather(assignments.token_index, order)
    expert_row_counts = tf.math.bincount(assignments.expert_index,
                                         minlength=routing.num_experts,
                                         maxlength=routing.num_experts, dtype=tf.int32)
    ops = (None if compiled_kernels is False else
           kernels.op_library_for(inputs, required=compiled_kernels is True))
    offsets = routing.token_offsets() if ops is not None else None
    sorted_assignments = _SortedAssignments(routing, order, inverse, sorted_tokens, ops,
                                            offsets)
    rows = experts(sorted_assignments.dispatch(inputs), expert_row_counts=expert_row_counts)
    return sorted_assignments.combine(rows, assignments.gate)


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


def capacity_dispatch(inputs, routing, experts, *, capacity, token_group_size=None,
                      expert_sharding=None):
    """GShard-style fixed-capacity dispatch with one-hot einsums.

    Each expert gets a buffer of `capacity` rows, `[experts, capacity, d_in]`; assignments
    that do not fit are dropped (those tokens get no contribution from that expert).
    All shapes are static when the token count is, as XLA and DTensor want.

    With `token_group_size`, the tokens are routed in token groups of that many (the last
    one padded with unused tokens), as GShard does: each token group has `capacity` slots
    per expert, the experts see `[experts, token groups x capacity, d_in]`, and the
    one-hot einsums cost tokens x token_group_size instead of tokens^2. Without it the
    whole batch is one token group.
    `expert_sharding` (an `ExpertSharding`, DTensor) moves the expert buffers onto the
    devices holding their experts and the results back.
    """
    num_tokens = tf.shape(inputs)[0]
    g = ""
    if token_group_size is not None:
        g = "g"
        routing = routing.in_token_groups(token_group_size)
        inputs = split_into_token_groups(inputs, token_group_size)  # [G, S, d_in]
    dispatch, combine = routing.capacity_masks(capacity)          # [(G,) S, E, C]
    expert_inputs = tf.einsum(f"{g}sec,{g}sd->e{g}cd", tf.cast(dispatch, inputs.dtype),
                              inputs)
    if g:
        buffers = tf.shape(expert_inputs)                         # [E, G, C, d_in]
        expert_inputs = tf.reshape(expert_inputs, [routing.num_experts, -1, buffers[-1]])
    if expert_sharding is not None:
        expert_inputs = expert_sharding.to_experts(expert_inputs)
    outputs = experts(expert_inputs)                              # [E, (G x) C, d_out]
    if expert_sharding is not None:
        outputs = expert_sharding.from_experts(outputs)
    if g:
        outputs = tf.reshape(outputs, tf.concat([buffers[:-1], tf.shape(outputs)[-1:]], 0))
    outputs = tf.einsum(f"{g}sec,e{g}co->{g}so", tf.cast(combine, outputs.dtype), outputs)
    if g:
        outputs = tf.reshape(outputs, [-1, tf.shape(outputs)[-1]])[:num_tokens]
    return outputs
