"""Which expert each token is sent to, in the two forms the gates produce.

A gate decides, for `tokens` tokens and `experts` experts, a set of (token, expert, gate
value) assignments. Top-k gates give every token the same number of slots (`SlotRouting`);
the strictly balanced gate lets an expert pick any number of a token's slots, so it gives a
dense matrix (`DenseRouting`). Both offer what the two dispatchers need:
`assignments()`, `sum_per_token()` and `token_offsets()` for the dropless sparse path and
`capacity_masks()` for the fixed-capacity einsum path. A gate value of exactly 0 marks an
unused slot (padding, masked tokens).
"""

from typing import NamedTuple

import tensorflow as tf


class Assignments(NamedTuple):
    """(token, expert, gate) triples, `[assignments]` each.

    An unused assignment (a slot with gate 0) has `expert_index == num_experts`: sorted by
    expert it comes after every used one, and no expert computes it.
    """

    token_index: tf.Tensor
    expert_index: tf.Tensor
    gate: tf.Tensor


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

    def capacity_masks(self, capacity) -> tuple[tf.Tensor, tf.Tensor]:
        """GShard-style dispatch and combine tensors, `[tokens, experts, capacity]` each
        (`[token groups, tokens, experts, capacity]` for an `in_token_groups` routing:
        every token group fills its own buffers).

        Every token's first choice is placed before any token's second choice, so that
        overflow drops the least preferred slots first; within a slot rank, earlier tokens
        come first. Assignments beyond `capacity` are dropped (their one-hot row is empty).
        """
        g = _token_group_axis(self.gate)
        active = tf.cast(self.gate > 0, self.gate.dtype)
        one_hot = tf.one_hot(self.expert_index, self.num_experts,
                             dtype=self.gate.dtype) * active[..., None]   # [(G,) T, K, E]
        swap = [*range(len(g)), len(g) + 1, len(g), len(g) + 2]  # T <-> K
        slot_major = tf.transpose(one_hot, swap)                          # [(G,) K, T, E]
        token_groups = [tf.shape(slot_major)[0]] if g else []
        flat = tf.reshape(slot_major, [*token_groups, -1, self.num_experts])
        position = tf.reshape(tf.cumsum(flat, axis=-2, exclusive=True), tf.shape(slot_major))
        position = tf.reduce_sum(tf.transpose(position, swap) * one_hot, axis=-1)
        position_one_hot = tf.one_hot(tf.cast(position, tf.int32), capacity,
                                      dtype=self.gate.dtype)              # [(G,) T, K, C]
        dispatch = tf.einsum(f"{g}tke,{g}tkc->{g}tec", one_hot, position_one_hot)
        combine = tf.einsum(f"{g}tke,{g}tkc->{g}tec", one_hot * self.gate[..., None],
                            position_one_hot)
        return dispatch, combine

    def in_token_groups(self, token_group_size: int) -> "SlotRouting":
        """The same routing as `[token groups, token_group_size, slots]` (see
        `split_into_token_groups`)."""
        return SlotRouting(split_into_token_groups(self.expert_index, token_group_size),
                           split_into_token_groups(self.gate, token_group_size),
                           self.num_experts)


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

    def capacity_masks(self, capacity) -> tuple[tf.Tensor, tf.Tensor]:
        """Dispatch and combine `[(token groups,) tokens, experts, capacity]`; earlier
        tokens first."""
        active = tf.cast(self.gate > 0, self.gate.dtype)
        position = tf.cumsum(active, axis=-2, exclusive=True)
        dispatch = tf.one_hot(tf.cast(position, tf.int32), capacity,
                              dtype=self.gate.dtype) * active[..., None]
        return dispatch, dispatch * self.gate[..., None]

    def in_token_groups(self, token_group_size: int) -> "DenseRouting":
        """The same routing as `[token groups, token_group_size, experts]` (see
        `split_into_token_groups`)."""
        return DenseRouting(split_into_token_groups(self.gate, token_group_size))


def split_into_token_groups(values: tf.Tensor, token_group_size: int) -> tf.Tensor:
    """`[tokens, ...]` -> `[token groups, token_group_size, ...]`, zero-padded to whole
    token groups (GShard's groups of the capacity dispatch).

    Padding tokens get gate 0 (and expert 0, or zero inputs): unused, like masked ones.
    """
    padding = -tf.shape(values)[0] % token_group_size
    values = tf.pad(values, [[0, padding]] + [[0, 0]] * (values.shape.rank - 1))
    return tf.reshape(values,
                      tf.concat([[-1, token_group_size], tf.shape(values)[1:]], axis=0))


def _token_group_axis(gate: tf.Tensor) -> str:
    """"g" when `gate` has a leading token groups axis (an `in_token_groups` routing),
    else ""."""
    return "g" if gate.shape.rank == 3 else ""
