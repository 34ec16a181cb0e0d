"""Sending tokens to their experts and combining the experts' outputs.

Both dispatchers take tokens `[tokens, d_in]`, a routing (see `routing.py`) and a
`FeedForwardExperts` layer, and return `sum_i G(x)_i E_i(x)`, `[tokens, d_out]`.
"""

import functools
import math
from typing import NamedTuple, Optional, Union

import tensorflow as tf
from tensorflow.python.ops import control_flow_util

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


def _runs_blockwise() -> bool:
    """Whether the capacity path's experts run as the sparse path's blocks of rows (on a
    CPU, outside XLA) rather than as batched matmuls (XLA, GPUs, DTensor).

    On a CPU the sparse path's experts (per-expert matmuls forward, a backward pass
    chosen by block size, the compiled kernels) beat TensorFlow's batched matmuls over
    many small buffers; XLA compiles batched matmuls well and cannot compile the
    blocks' loop and in-place writes.
    """
    # TensorFlow has no public way to ask whether a graph is being compiled by XLA.
    in_xla = control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())
    return not in_xla and not tf.config.list_logical_devices("GPU")


def _run_experts_on_buffers(experts, buffers, *, blockwise: bool):
    """`[experts, rows, d_in]` -> `[experts, rows, d_out]`, each expert on its rows;
    `blockwise`: as equal blocks of sorted rows (see `_runs_blockwise`)."""
    if not blockwise:
        return experts(buffers)
    num_experts, rows = tf.shape(buffers)[0], tf.shape(buffers)[1]
    outputs = experts(tf.reshape(buffers, [-1, buffers.shape[-1]]),
                      expert_row_counts=tf.fill([num_experts], rows))
    return tf.reshape(outputs, [num_experts, rows, outputs.shape[-1]])


class CapacityDispatch(NamedTuple):
    """The capacity dispatch's result.

    Attributes:
        outputs: `[tokens, d_out]`, sum_i G(x)_i E_i(x) over the kept assignments.
        dropped_fraction: float32 scalar, the share of the used assignments that found
            no slot (0 when there were none).
    """

    outputs: tf.Tensor
    dropped_fraction: tf.Tensor


def capacity_dispatch(inputs, routing, experts, *, capacity, token_group_size=None,
                      expert_sharding=None) -> CapacityDispatch:
    """GShard-style fixed-capacity dispatch by index arithmetic, with static shapes.

    Each expert gets a buffer of `capacity` rows per token group; assignments that do not
    fit are dropped (those tokens get no contribution from that expert), by the priority
    rule of `routing.capacity_slots`. The rows move with gathers and the results come back
    with a segment sum, by the token index of each slot (`CapacitySlots`): nothing of size
    tokens x experts x capacity, and the experts run as batched matmuls on
    `[experts, token groups x capacity, d_in]`. All shapes are static when the token
    count is, as XLA and DTensor want.

    With `token_group_size`, the tokens are routed in token groups of that many (the last
    one padded with unused tokens), as GShard does: each token group has `capacity` slots
    per expert. Without it the whole batch is one token group.
    `expert_sharding` (an `ExpertSharding`, DTensor) moves the expert buffers onto the
    devices holding their experts and the results back.
    """
    if expert_sharding is not None:
        # The slot arithmetic needs whole token arrays (a batch shard's tokens cannot
        # be padded or grouped in place): it runs on the batch, replicated.
        inputs = expert_sharding.gather_tokens(inputs)
        routing = type(routing)(*[expert_sharding.gather_tokens(value)
                                  if isinstance(value, tf.Tensor) else value
                                  for value in routing])
    num_tokens = tf.shape(inputs)[0]
    slots = routing.in_token_groups(token_group_size).capacity_slots(capacity)
    inputs = split_into_token_groups(inputs, token_group_size)          # [G, S, d_in]
    groups, group_size = tf.shape(inputs)[0], tf.shape(inputs)[1]
    # Row g (S + 1) + t of the flat padded tokens is token t of group g; the last row of
    # each group is the zero row that the empty slots read.
    padded = tf.reshape(tf.pad(inputs, [[0, 0], [0, 1], [0, 0]]), [-1, inputs.shape[-1]])
    slot_rows = tf.reshape(tf.transpose(
        slots.token_index + (group_size + 1) * tf.range(groups)[:, None, None],
        [1, 0, 2]), [routing.num_experts, -1])                          # [E, G x C]
    expert_inputs = tf.gather(padded, slot_rows)
    if expert_sharding is not None:
        expert_inputs = expert_sharding.to_experts(expert_inputs)
    outputs = _run_experts_on_buffers(experts, expert_inputs,
                                      blockwise=expert_sharding is None
                                      and _runs_blockwise())     # [E, G x C, d_out]
    if expert_sharding is not None:
        outputs = expert_sharding.from_experts(outputs)
    slot_gates = tf.reshape(tf.transpose(slots.gate, [1, 0, 2]), [routing.num_experts, -1])
    combined = tf.math.unsorted_segment_sum(
        outputs * tf.cast(slot_gates, outputs.dtype)[..., None], slot_rows,
        groups * (group_size + 1))                                       # [G (S + 1), d]
    width = tf.shape(outputs)[-1]
    combined = tf.reshape(combined, [groups, group_size + 1, width])[:, :-1]
    combined = tf.reshape(combined, [-1, width])[:num_tokens]
    if expert_sharding is not None:
        combined = expert_sharding.split_tokens(combined)
    dropped = tf.math.divide_no_nan(slots.num_used - slots.num_kept, slots.num_used)
    return CapacityDispatch(outputs=combined, dropped_fraction=dropped)
