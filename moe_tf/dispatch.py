"""Sending tokens to their experts and combining the experts' outputs.

Both dispatchers take tokens `[tokens, d_in]`, a routing (see `routing.py`) and a
`FeedForwardExperts` layer, and return `sum_i G(x)_i E_i(x)`, `[tokens, d_out]`.
"""

import functools
import math
from typing import NamedTuple, Optional, Union

import tensorflow as tf

from moe_tf import kernels
from moe_tf.routing import split_into_token_groups, static_shape


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
                    compiled_kernels: Union[str, bool] = False,
                    gathered_weights_up_to: int = 0):
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

    Calls with at most `gathered_weights_up_to` routing slots (tokens x k for a slot
    routing, tokens x experts for a dense one; the layer passes 0 in training calls) take
    `gathered_weights_dispatch` instead: the same sums in fewer ops, no gradient path.
    """
    if gathered_weights_up_to:
        return tf.cond(
            tf.size(routing.gate) <= gathered_weights_up_to,
            lambda: gathered_weights_dispatch(inputs, routing, experts),
            lambda: sparse_dispatch(inputs, routing, experts,
                                    compiled_kernels=compiled_kernels))
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


def gathered_weights_dispatch(inputs, routing, experts):
    """Dropless dispatch for small calls: each assignment's token multiplied by its
    expert's gathered weights (`FeedForwardExperts.per_assignment`), then the
    gate-weighted sum per token. No sort and no loop over the experts; each assignment
    reads its expert's whole kernels. Forward only (inference)."""
    assignments = routing.assignments()
    # An unused assignment (gate 0) names no expert: any expert's output, times 0.
    expert_index = tf.minimum(assignments.expert_index, routing.num_experts - 1)
    rows = experts.per_assignment(tf.gather(inputs, assignments.token_index),
                                  expert_index)
    return routing.sum_per_token(rows * tf.cast(assignments.gate, rows.dtype)[:, None])


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


def _runs_blockwise(experts, sorted_rows, compiled_kernels) -> bool:
    """Whether the capacity path's experts run as the sparse path's blocks of
    `sorted_rows` (on a CPU) rather than as batched matmuls (GPUs, and XLA where the
    compiled kernels do not run).

    On a CPU the sparse path's experts (per-expert matmuls forward, a backward pass
    chosen by block size, the compiled kernels) beat TensorFlow's batched matmuls over
    many small buffers, and the compiled kernels beat XLA's batched dots (they run there
    as custom calls); XLA cannot compile the blocks' TensorFlow loop.
    """
    if tf.config.list_logical_devices("GPU"):
        return False
    return (not kernels.compiling_with_xla()
            or experts.runs_compiled_kernels(sorted_rows, compiled_kernels))


def _run_experts_on_buffers(experts, buffers, *, sharded: bool, compiled_kernels):
    """`[*groups, experts, capacity, d_in]` -> `[*groups, experts, capacity, d_out]`, each
    expert on its rows of every group: as equal blocks of sorted rows where
    `_runs_blockwise` (never when `sharded` over a DTensor mesh), else as batched matmuls
    over `[experts, rows, d_in]`."""
    shape = static_shape(buffers)
    groups_rank = len(shape) - 3
    num_experts = shape[groups_rank]
    experts_first = [groups_rank] + list(range(groups_rank)) + [groups_rank + 1,
                                                                 groups_rank + 2]
    # Under DTensor the groups' first axis is split over "batch": merging it with the
    # whole axes after it keeps that split.
    rows = tf.reshape(tf.transpose(buffers, experts_first), [num_experts, -1, shape[-1]])
    sorted_rows = tf.reshape(rows, [-1, shape[-1]])
    if not sharded and _runs_blockwise(experts, sorted_rows, compiled_kernels):
        outputs = experts(sorted_rows,
                          expert_row_counts=tf.fill([num_experts], tf.shape(rows)[1]))
    else:
        outputs = experts(rows)
    outputs = tf.reshape(outputs, [num_experts] + shape[:groups_rank] + shape[-2:-1]
                         + [outputs.shape[-1]])
    return tf.transpose(outputs, tf.math.invert_permutation(experts_first))


def _pad_one_row(values, axis: int):
    """A zero row appended on `axis` (counted from the end), for empty slots to read."""
    padding = [[0, 0]] * values.shape.rank
    padding[values.shape.rank + axis] = [0, 1]
    return tf.pad(values, padding)


def _gather_rows(values, index, groups_rank: int):
    """`values` `[*groups, rows, d]`, `index` int32 `[*groups, ...]` ->
    `[*groups, ..., d]`: the rows at `index` within each group."""
    shape = static_shape(index)
    flat = tf.gather(values, tf.reshape(index, shape[:groups_rank] + [-1]),
                     batch_dims=groups_rank)
    return tf.reshape(flat, shape + [values.shape[-1]])


def _sum_per_token_in_order(slot_rows, token_index, group_size):
    """`[*groups, experts, capacity, d]` -> `[*groups, token_group_size, d]`, each token's
    sum of its slots' rows, for routings where a token has any number of slots.

    Sorted by token (one marker per token sorts before the token's rows, as in
    `routing._slots_in_priority_order`), a running sum read at the markers and
    differenced: only sorts, gathers and a cumulative sum, each within a group (a segment
    sum is not, under DTensor). The running sum is float64, so that the differences are
    exact to float32.
    """
    shape = static_shape(slot_rows)
    group_shape, width = shape[:-3], shape[-1]
    groups_rank = len(group_shape)
    rows = tf.reshape(slot_rows, group_shape + [-1, width])            # [*G, N, d]
    tokens = tf.reshape(token_index, group_shape + [-1])               # [*G, N]
    num_rows = static_shape(tokens)[-1]
    markers = tf.broadcast_to(tf.range(group_size + 1), group_shape + [group_size + 1])
    order = tf.argsort(tf.concat([2 * tokens + 1, 2 * markers], axis=-1), axis=-1,
                       stable=True)
    marker_position = tf.argsort(order, axis=-1, stable=True)[..., num_rows:]
    rows = tf.concat([tf.cast(rows, tf.float64),
                      tf.zeros(group_shape + [group_size + 1, width], tf.float64)], axis=-2)
    running = tf.cumsum(tf.gather(rows, order, batch_dims=groups_rank), axis=-2)
    before = tf.gather(running, marker_position, batch_dims=groups_rank)  # [*G, S+1, d]
    return tf.cast(before[..., 1:, :] - before[..., :-1, :], slot_rows.dtype)


class _SlotMoves(NamedTuple):
    """The rows' moves between a routing's tokens and the experts' slots: into the slots
    by gathers of each slot's token, back by sums of each token's slots; each one's
    gradient is the other. No scatter, so that under DTensor every move stays within a
    device's own groups.

    Attributes:
        slots: the `CapacitySlots`.
        gate: float32 `[*groups, token_group_size, slots]`, the routing's gates (in the
            order of `slots.assignment_slot`).
    """

    slots: object
    gate: tf.Tensor

    @property
    def groups_rank(self) -> int:
        return self.gate.shape.rank - 2

    def _per_token(self, slot_rows):
        """`[*groups, experts, capacity, d]` -> `[*groups, token_group_size, d]`: each
        token's sum over its slots."""
        if self.slots.varying_slots_per_token:
            return _sum_per_token_in_order(slot_rows, self.slots.token_index,
                                           static_shape(self.gate)[-2])
        rows = _gather_rows(_flat_slots(slot_rows), self.slots.assignment_slot,
                            self.groups_rank)                    # [*G, S, K, d]
        return tf.reduce_sum(rows, axis=-2)

    def _per_slot(self, token_rows):
        """`[*groups, token_group_size, d]` -> `[*groups, experts, capacity, d]`: each
        slot's token row (zero for an empty slot)."""
        return _gather_rows(_pad_one_row(token_rows, -2), self.slots.token_index,
                            self.groups_rank)

    def _slot_gate(self, dtype):
        return tf.cast(self.slots.gate, dtype)[..., None]

    def dispatch(self, tokens):
        """`[*groups, token_group_size, d_in]` -> `[*groups, experts, capacity, d_in]`."""
        @tf.custom_gradient
        def to_slots(tokens):
            return self._per_slot(tokens), self._per_token

        return to_slots(tokens)

    def combine(self, outputs):
        """`[*groups, experts, capacity, d_out]` -> `[*groups, token_group_size, d_out]`,
        each token's sum of gate x its experts' outputs."""
        @tf.custom_gradient
        def weighted_sum(outputs, gate):
            def grad(d_combined):
                d_slots = self._per_slot(d_combined)            # [*G, E, C, d]
                # The gate of an assignment: its token's gradient . its expert's output.
                d_slot_gate = tf.reduce_sum(tf.cast(d_slots, tf.float32)
                                            * tf.cast(outputs, tf.float32), axis=-1)
                d_gate = _gather_rows(_flat_slots(d_slot_gate[..., None]),
                                      self.slots.assignment_slot, self.groups_rank)
                return d_slots * self._slot_gate(d_slots.dtype), d_gate[..., 0]

            return self._per_token(outputs * self._slot_gate(outputs.dtype)), grad

        return weighted_sum(outputs, self.gate)


def _flat_slots(values):
    """`[*groups, experts, capacity, d]` -> `[*groups, experts x capacity + 1, d]`, the
    last row zero (what an unused or dropped assignment reads)."""
    shape = static_shape(values)
    return _pad_one_row(tf.reshape(values, shape[:-3] + [-1, shape[-1]]), -2)


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
                      expert_sharding=None,
                      compiled_kernels: Union[str, bool] = False) -> CapacityDispatch:
    """GShard-style fixed-capacity dispatch by index arithmetic, with static shapes.

    The tokens are routed in token groups, each with `capacity` slots per expert;
    assignments that do not fit are dropped (those tokens get no contribution from that
    expert), by the priority rule of `routing.capacity_slots`. The rows move into the
    experts' buffers `[*groups, experts, capacity, d]` and back with gathers by each
    slot's token and each assignment's slot (`CapacitySlots`): nothing of size
    tokens x experts x capacity, and the experts run as batched matmuls (or the sparse
    path's blocks, see `_runs_blockwise`). All shapes are static when the token count
    is, as XLA and DTensor want. `compiled_kernels` is the experts' setting as the layer
    passes it (False outside training calls): under XLA the experts run as blocks only
    where it lets the compiled kernels run.

    On one device the groups are `token_group_size` tokens each (the last one padded
    with unused tokens), or the whole batch without it. With `expert_sharding` (an
    `ExpertSharding`, DTensor) each device routes its own share of the batch as its
    groups (`ExpertSharding.group_tokens`), and the buffers move to the devices holding
    their experts and back by one all-to-all each way (`to_experts`, `from_experts`).
    """
    if expert_sharding is None:
        def group(values):
            return split_into_token_groups(values, token_group_size)
    else:
        def group(values):
            return expert_sharding.group_tokens(values, token_group_size)
    grouped = routing.grouped(group)
    slots = grouped.capacity_slots(capacity)
    tokens = group(inputs)                                              # [*G, S, d_in]
    moves = _SlotMoves(slots, grouped.gate)
    buffers = moves.dispatch(tokens)
    if expert_sharding is not None:
        buffers = expert_sharding.to_experts(buffers)
    outputs = _run_experts_on_buffers(
        experts, buffers, sharded=expert_sharding is not None,
        compiled_kernels=compiled_kernels)                              # [*G, E, C, d_out]
    if expert_sharding is not None:
        outputs = expert_sharding.from_experts(outputs)
    combined = moves.combine(outputs)
    if expert_sharding is not None:
        combined = expert_sharding.ungroup_tokens(combined)
    else:
        combined = tf.reshape(combined, [-1, combined.shape[-1]])[:tf.shape(inputs)[0]]
    dropped = tf.math.divide_no_nan(slots.num_used - slots.num_kept, slots.num_used)
    return CapacityDispatch(outputs=combined, dropped_fraction=dropped)
