"""Which expert each token is sent to, in the two forms the gates produce.

A gate decides, for `tokens` tokens and `experts` experts, a set of (token, expert, gate
value) assignments. Top-k gates give every token the same number of slots (`SlotRouting`);
the strictly balanced gate lets an expert pick any number of a token's slots, so it gives a
dense matrix (`DenseRouting`). Both offer what the two dispatchers need:
`assignments()`, `sum_per_token()` and `token_offsets()` for the dropless sparse path and
`capacity_slots()` for the fixed-capacity path. A gate value of exactly 0 marks an
unused slot (padding, masked tokens).
"""

from typing import NamedTuple, Optional

import tensorflow as tf


class Assignments(NamedTuple):
    """(token, expert, gate) triples, `[assignments]` each.

    An unused assignment (a slot with gate 0) has `expert_index == num_experts`: sorted by
    expert it comes after every used one, and no expert computes it.
    """

    token_index: tf.Tensor
    expert_index: tf.Tensor
    gate: tf.Tensor


class CapacitySlots(NamedTuple):
    """What fills each slot of the experts' fixed-size buffers, in every token group.

    `[*groups]` are the routing's leading token-group dimensions: `[token groups]` on one
    device, `[batch shards, expert shards, groups per device]` under DTensor.

    Attributes:
        token_index: int32 `[*groups, experts, capacity]`, the token (its index in its
            group) in each slot; `token_group_size` for an empty slot, one past the last
            token: the dispatcher gathers a zero row there.
        gate: float32 `[*groups, experts, capacity]`, each slot's gate value; 0 for an
            empty slot. Not differentiable: the combine reads the routing's gates.
        num_used: float32 scalar, the used assignments.
        num_kept: float32 scalar, the used assignments that found a slot (the rest are
            dropped).
        assignment_slot: int32 `[*groups, token_group_size, slots]` (`slots` the
            routing's: k, or every expert for a `DenseRouting`), the slot
            (`expert * capacity + c`) of each of a token's assignments, `experts *
            capacity` where it has none (unused or dropped): the inverse of
            `token_index`.
        varying_slots_per_token: whether a token may fill any number of slots (a
            `DenseRouting`), so that summing a token's slots cannot be a gather of a
            fixed number of them.
    """

    token_index: tf.Tensor
    gate: tf.Tensor
    num_used: tf.Tensor
    num_kept: tf.Tensor
    assignment_slot: tf.Tensor
    varying_slots_per_token: bool = False


class SlotRouting(NamedTuple):
    """K slots per token, best choice first.

    Attributes:
        expert_index: int32 `[tokens, slots]`.
        gate: float32 `[tokens, slots]`, 0 for an unused slot.
        num_experts: the number of experts (a Python int).
    """

    expert_index: tf.Tensor
    gate: tf.Tensor
    num_experts: int

    def assignments(self) -> Assignments:
        """Every slot, token-major (slot j of token t is assignment t * slots + j)."""
        slots = tf.shape(self.gate)[1]
        gate = tf.reshape(self.gate, [-1])
        return Assignments(
            token_index=tf.repeat(tf.range(tf.shape(self.gate)[0]), slots),
            expert_index=tf.where(gate > 0, tf.reshape(self.expert_index, [-1]),
                                  self.num_experts),
            gate=gate)

    def sum_per_token(self, values: tf.Tensor) -> tf.Tensor:
        """`[assignments, d]` in `assignments()` order -> `[tokens, d]`, each token's sum.

        A reshape and a sum over the slots: no scatter.
        """
        slots = tf.shape(self.gate)[1]
        return tf.reduce_sum(tf.reshape(values, [-1, slots, tf.shape(values)[-1]]), axis=1)

    def token_offsets(self) -> tf.Tensor:
        """int32 `[tokens + 1]`: token t's assignments are `offsets[t] .. offsets[t+1]-1`."""
        return tf.range(tf.shape(self.gate)[0] + 1) * tf.shape(self.gate)[1]

    def expert_counts(self) -> tf.Tensor:
        """float32 `[experts]`: how many tokens each expert receives (dropless)."""
        return tf.math.unsorted_segment_sum(
            tf.reshape(tf.cast(self.gate > 0, tf.float32), [-1]),
            tf.reshape(self.expert_index, [-1]), self.num_experts)

    def importance(self) -> tf.Tensor:
        """float32 `[experts]`: Importance(X)_i = sum_x G(x)_i."""
        return tf.math.unsorted_segment_sum(
            tf.reshape(self.gate, [-1]), tf.reshape(self.expert_index, [-1]),
            self.num_experts)

    def dense_gates(self) -> tf.Tensor:
        """float32 `[tokens, experts]`, G(x) with zeros for unselected experts."""
        one_hot = tf.one_hot(self.expert_index, self.num_experts, dtype=self.gate.dtype)
        return tf.einsum("tk,tke->te", self.gate, one_hot)

    def capacity_slots(self, capacity) -> CapacitySlots:
        """The slots of `capacity` rows per expert that this grouped routing
        (`[*groups, token_group_size, slots]`, see `grouped`) fills, each group its own.

        Every token's first choice is placed before any token's second choice, so that
        overflow drops the least preferred assignments first; within a choice rank,
        earlier tokens come first. The assignments are sorted by expert in that priority
        order, so that each expert's slots are a contiguous run of the sorted order: no
        tensor of size tokens x experts x capacity, work O(tokens k log(tokens k)), and
        every op works within a group (DTensor runs it on each device's own groups).
        """
        shape = static_shape(self.gate)
        group_shape, group_size, num_slots = shape[:-2], shape[-2], shape[-1]
        used = self.gate > 0
        groups_rank = len(group_shape)
        swap_last = list(range(groups_rank)) + [groups_rank + 1, groups_rank]

        def rank_major(values):  # [*G, S, K] -> [*G, K S]: first choices first
            return tf.reshape(tf.transpose(values, swap_last), group_shape + [-1])

        tokens = tf.broadcast_to(tf.range(group_size)[:, None], shape)
        slots = _slots_in_priority_order(
            expert=rank_major(tf.where(used, self.expert_index, self.num_experts)),
            token=rank_major(tokens), gate=rank_major(self.gate),
            num_experts=self.num_experts, capacity=capacity, group_size=group_size)
        assignment_slot = tf.transpose(tf.reshape(
            slots.assignment_slot, group_shape + [num_slots, group_size]), swap_last)
        return slots._replace(num_used=tf.reduce_sum(tf.cast(used, tf.float32)),
                              assignment_slot=assignment_slot)

    def grouped(self, group) -> "SlotRouting":
        """The same routing with its tokens in groups: `group` maps each `[tokens, ...]`
        to `[*groups, token_group_size, ...]` (`split_into_token_groups`, or
        `ExpertSharding.group_tokens` under DTensor)."""
        return SlotRouting(group(self.expert_index), group(self.gate), self.num_experts)

    def in_token_groups(self, token_group_size: Optional[int]) -> "SlotRouting":
        """The same routing as `[token groups, token_group_size, slots]` (see
        `split_into_token_groups`)."""
        return self.grouped(lambda values: split_into_token_groups(values, token_group_size))


class DenseRouting(NamedTuple):
    """A dense gate matrix.

    Attributes:
        gate: float32 `[tokens, experts]`, 0 where a token does not go to an expert.
    """

    gate: tf.Tensor

    @property
    def num_experts(self) -> int:
        return self.gate.shape[-1]

    def assignments(self) -> Assignments:
        """The used (token, expert) pairs only; dynamic length."""
        where = tf.cast(tf.where(self.gate > 0), tf.int32)               # [A, 2]
        return Assignments(token_index=where[:, 0], expert_index=where[:, 1],
                           gate=tf.gather_nd(self.gate, where))

    def sum_per_token(self, values: tf.Tensor) -> tf.Tensor:
        """`[assignments, d]` in `assignments()` order -> `[tokens, d]`, per-token sums."""
        return tf.math.unsorted_segment_sum(values, self.assignments().token_index,
                                            tf.shape(self.gate)[0])

    def token_offsets(self) -> tf.Tensor:
        """int32 `[tokens + 1]`: token t's assignments are `offsets[t] .. offsets[t+1]-1`."""
        per_token = tf.reduce_sum(tf.cast(self.gate > 0, tf.int32), axis=1)
        return tf.concat([[0], tf.cumsum(per_token)], axis=0)

    def expert_counts(self) -> tf.Tensor:
        return tf.reduce_sum(tf.cast(self.gate > 0, tf.float32), axis=0)

    def importance(self) -> tf.Tensor:
        return tf.reduce_sum(self.gate, axis=0)

    def dense_gates(self) -> tf.Tensor:
        return self.gate

    def capacity_slots(self, capacity) -> CapacitySlots:
        """The slots of `capacity` rows per expert that this grouped routing
        (`[*groups, token_group_size, experts]`) fills: each expert takes its used
        tokens in token order until its slots are full (a top-`capacity` over its
        tokens, the size of the gate matrix; every op within a group)."""
        shape = static_shape(self.gate)
        group_shape, group_size, num_experts = shape[:-2], shape[-2], shape[-1]
        groups_rank = len(group_shape)
        swap_last = list(range(groups_rank)) + [groups_rank + 1, groups_rank]
        used = self.gate > 0
        # Earlier used tokens score higher; unused ones and the empty tokens (appended so
        # that there are at least `capacity` candidates) score 0.
        empty = [[0, 0]] * (groups_rank + 1) + [[0, tf.maximum(capacity - group_size, 1)]]
        score = tf.where(used, (group_size - tf.range(group_size))[:, None], 0)
        score = tf.pad(tf.transpose(score, swap_last), empty)
        best, token = tf.math.top_k(score, k=capacity)                  # [*G, E, C]
        filled = best > 0
        gate = tf.pad(tf.transpose(tf.stop_gradient(self.gate), swap_last), empty)
        # A token's slot with an expert: how many of the expert's used tokens precede it.
        rank = tf.cumsum(tf.cast(used, tf.int32), axis=-2, exclusive=True)  # [*G, S, E]
        kept = used & (rank < capacity)
        return CapacitySlots(
            token_index=tf.where(filled, token, group_size),
            gate=tf.gather(gate, token, batch_dims=groups_rank + 1),
            num_used=tf.reduce_sum(tf.cast(used, tf.float32)),
            num_kept=tf.reduce_sum(tf.cast(filled, tf.float32)),
            assignment_slot=tf.where(kept, tf.range(num_experts) * capacity + rank,
                                     num_experts * capacity),
            varying_slots_per_token=True)

    def grouped(self, group) -> "DenseRouting":
        """The same routing with its tokens in groups (see `SlotRouting.grouped`)."""
        return DenseRouting(group(self.gate))

    def in_token_groups(self, token_group_size: Optional[int]) -> "DenseRouting":
        """The same routing as `[token groups, token_group_size, experts]` (see
        `split_into_token_groups`)."""
        return self.grouped(lambda values: split_into_token_groups(values, token_group_size))


def _slots_in_priority_order(*, expert, token, gate, num_experts: int, capacity,
                             group_size) -> CapacitySlots:
    """Fills each expert's `capacity` slots with its first assignments in the given order.

    Args:
        expert, token, gate: `[*groups, assignments]` in priority order; an unused
            assignment has expert `num_experts`.
    Returns:
        The slots, with `assignment_slot` in the given order `[*groups, assignments]`;
        `num_used` is left to the caller.
    """
    shape = static_shape(expert)
    group_shape, num_assignments = shape[:-1], shape[-1]
    groups_rank = len(group_shape)
    # One marker per expert sorts just before that expert's assignments (marker
    # `num_experts` before the unused ones): where the markers land in the sorted order
    # delimits each expert's run. (Markers rather than tf.searchsorted or a segment sum:
    # DTensor can run neither on a device's own groups.)
    markers = tf.broadcast_to(tf.range(num_experts + 1), group_shape + [num_experts + 1])
    keys = tf.concat([2 * expert + 1, 2 * markers], axis=-1)
    order = tf.argsort(keys, axis=-1, stable=True)
    sorted_position = tf.argsort(order, axis=-1, stable=True)  # the inverse permutation
    marker_position = sorted_position[..., num_assignments:]            # [*G, E + 1]
    counts = marker_position[..., 1:] - marker_position[..., :-1] - 1   # [*G, E]
    slot = tf.range(capacity)
    filled = slot < counts[..., None]                                   # [*G, E, C]
    position = tf.where(filled, marker_position[..., :-1, None] + 1 + slot, 0)
    slots_shape = static_shape(position)
    entry = tf.reshape(tf.gather(order, tf.reshape(position, group_shape + [-1]),
                                 batch_dims=groups_rank), slots_shape)
    # Where `filled`, `entry` is an assignment; elsewhere (a marker) it reads an empty
    # value appended after the assignments (a group may have none).
    entry = tf.reshape(tf.minimum(entry, num_assignments), group_shape + [-1])

    def in_slots(values, empty):
        values = tf.concat([values, tf.fill(group_shape + [1], tf.cast(empty, values.dtype))],
                           axis=-1)
        picked = tf.gather(values, entry, batch_dims=groups_rank)
        return tf.where(filled, tf.reshape(picked, slots_shape), empty)

    rank_in_expert = (sorted_position[..., :num_assignments] - 1
                      - tf.gather(marker_position, expert, batch_dims=groups_rank))
    kept = (expert < num_experts) & (rank_in_expert < capacity)
    return CapacitySlots(
        token_index=in_slots(token, group_size),
        gate=in_slots(tf.stop_gradient(gate), 0.0),
        num_used=None, num_kept=tf.reduce_sum(tf.cast(filled, tf.float32)),
        assignment_slot=tf.where(kept, expert * capacity + rank_in_expert,
                                 num_experts * capacity))


def static_shape(values: tf.Tensor) -> list:
    """The shape of `values` as a list: Python ints where known, scalars otherwise.

    Static sizes keep reshapes exact under DTensor, whose shapes are global.
    """
    dynamic = tf.shape(values)
    return [size if size is not None else dynamic[i]
            for i, size in enumerate(values.shape.as_list())]


def split_into_token_groups(values: tf.Tensor,
                            token_group_size: Optional[int]) -> tf.Tensor:
    """`[tokens, ...]` -> `[token groups, token_group_size, ...]`, zero-padded to whole
    token groups (GShard's groups of the capacity dispatch); None: one group of all.

    Padding tokens get gate 0 (and expert 0, or zero inputs): unused, like masked ones.
    """
    if token_group_size is None:
        # Not values[None]: DTensor (TF 2.21) crashes on a StridedSlice's new axis.
        return tf.expand_dims(values, 0)
    padding = -tf.shape(values)[0] % token_group_size
    values = tf.pad(values, [[0, padding]] + [[0, 0]] * (values.shape.rank - 1))
    return tf.reshape(values,
                      tf.concat([[-1, token_group_size], tf.shape(values)[1:]], axis=0))
