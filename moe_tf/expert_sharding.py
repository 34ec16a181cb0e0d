"""Expert parallelism with DTensor: each device of a mesh axis holds a share of the experts.

The paper's layout (Section 3.1): the ordinary layers are data parallel (batch split over
the mesh's batch axis, weights replicated) while each expert exists once, the experts
split over the expert axis. The fixed-capacity dispatch moves the tokens as GShard does,
with each device's tokens as its own groups:

    group_tokens   [tokens, d] -> [batch shards, expert shards, groups, S, d]: each device
                   takes its share of its batch shard (a slice; the ordinary layers'
                   batch shard is whole on every device of the expert axis)
    dispatch       within each device's groups: [..., S, d] -> [..., experts, capacity, d]
    to_experts     relayout, the groups' expert-shard axis whole and the experts split
                   over the expert axis: the all-to-all (each device sends each other
                   device of its expert axis the slots of that device's experts)
    experts        each device runs its own experts on every group of its batch shard
    from_experts   relayout back: the all-to-all the other way
    combine        within each device's groups
    ungroup_tokens [...] -> [tokens, d_out] split over the batch axis: an all-gather over
                   the expert axis of the combined outputs (d_out per token, not
                   k x capacity_factor x d_out as the buffers are)

No device holds another device's groups' buffers or all experts' outputs; the gradients
move the same ways back (a relayout's gradient is the opposite relayout).

`ExpertSharding` holds the mesh and answers which layout each weight gets; a layer uses it
through `SparselyGatedMoE.shard_experts`. It is a runtime placement, not part of a layer's
configuration: a saved or exported layer is always unplaced.
"""

from typing import Optional

import tensorflow as tf
from tensorflow.experimental import dtensor

# The FeedForwardExperts weights stacked over the experts (axis 0).
EXPERT_WEIGHT_NAMES = ("kernel_in", "bias_in", "kernel_out", "bias_out")


class ExpertSharding:
    """Layouts on a DTensor mesh with a batch axis and an expert axis.

    Args:
        mesh: a `dtensor.Mesh` with both axes.
        batch_axis: the mesh dimension the batch (tokens) is split over.
        expert_axis: the mesh dimension the experts are split over.
    """

    def __init__(self, mesh: dtensor.Mesh, *, batch_axis: str = "batch",
                 expert_axis: str = "expert"):
        for axis in (batch_axis, expert_axis):
            if axis not in mesh.dim_names:
                raise ValueError(f"ExpertSharding: the mesh has no {axis!r} axis; its axes "
                                 f"are {list(mesh.dim_names)}.")
        self.mesh = mesh
        self.batch_axis = batch_axis
        self.expert_axis = expert_axis

    @property
    def num_expert_shards(self) -> int:
        return self.mesh.dim_size(self.expert_axis)

    @property
    def num_batch_shards(self) -> int:
        return self.mesh.dim_size(self.batch_axis)

    def replicated(self, rank: int) -> dtensor.Layout:
        return dtensor.Layout.replicated(self.mesh, rank)

    def batch_sharded(self, rank: int) -> dtensor.Layout:
        """Axis 0 split over the batch axis, the rest whole."""
        return dtensor.Layout.batch_sharded(self.mesh, self.batch_axis, rank)

    def expert_sharded(self, rank: int) -> dtensor.Layout:
        """Axis 0 (the experts) split over the expert axis, the rest whole."""
        return dtensor.Layout([self.expert_axis] + [dtensor.UNSHARDED] * (rank - 1),
                              self.mesh)

    def weight_layout(self, variable) -> dtensor.Layout:
        """Expert-sharded for an experts' stacked weight (path `.../experts/kernel_in`
        etc.), replicated for everything else."""
        rank = len(variable.shape)
        return (self.expert_sharded(rank) if is_expert_weight(variable)
                else self.replicated(rank))

    def tokens_per_device(self, num_tokens):
        """Each device's share of `num_tokens` tokens (batch shards x expert shards)."""
        return num_tokens // (self.num_batch_shards * self.num_expert_shards)

    def _layout(self, specs) -> dtensor.Layout:
        return dtensor.Layout([spec or dtensor.UNSHARDED for spec in specs], self.mesh)

    def group_tokens(self, values: tf.Tensor,
                     token_group_size: Optional[int] = None) -> tf.Tensor:
        """Batch-split `[tokens, ...]` -> `[batch shards, expert shards, groups,
        token_group_size, ...]`, split over both mesh axes: each device's share of the
        tokens, in groups of `token_group_size` (None: one group per device).

        Raises:
            ValueError: the tokens do not split evenly over the devices, or
                `token_group_size` does not divide a device's share.
        """
        num_tokens = values.shape[0]
        devices = self.num_batch_shards * self.num_expert_shards
        if num_tokens is None:
            raise ValueError("ExpertSharding: the token count must be static under "
                             "DTensor; got a batch of unknown size.")
        if num_tokens % devices:
            raise ValueError(
                f"ExpertSharding: {num_tokens} tokens do not split evenly over the mesh's "
                f"{self.num_batch_shards} batch x {self.num_expert_shards} expert shards "
                f"({devices} devices); pad the batch to a multiple of {devices} rows.")
        share = self.tokens_per_device(num_tokens)
        group_size = token_group_size or share
        if share % group_size:
            raise ValueError(
                f"ExpertSharding: capacity_group_size={token_group_size} must divide the "
                f"tokens per device ({share} = {num_tokens} tokens / {devices} devices).")
        rest = values.shape[1:].as_list()
        # Pinned first: DTensor would otherwise carry the expert-axis split back through
        # the reshape into the layers before (and refuse some of their gradients).
        values = dtensor.relayout(values, self.batch_sharded(values.shape.rank))
        grouped = tf.reshape(values, [self.num_batch_shards, self.num_expert_shards,
                                      share // group_size, group_size] + rest)
        return dtensor.relayout(grouped, self._layout(
            [self.batch_axis, self.expert_axis] + [None] * (2 + len(rest))))

    def ungroup_tokens(self, values: tf.Tensor) -> tf.Tensor:
        """`group_tokens`' `[batch shards, expert shards, groups, S, ...]` -> `[tokens,
        ...]` split over the batch axis, whole on the expert axis (an all-gather there)."""
        whole = dtensor.relayout(values, self._layout(
            [self.batch_axis] + [None] * (values.shape.rank - 1)))
        tokens = tf.reshape(whole, [-1] + values.shape[4:].as_list())
        return dtensor.relayout(tokens, self.batch_sharded(tokens.shape.rank))

    def to_experts(self, buffers: tf.Tensor) -> tf.Tensor:
        """Grouped buffers `[batch shards, expert shards, groups, experts, capacity, d]`
        split over both mesh axes by group -> the same split over the batch axis by group
        and over the expert axis by expert: the all-to-all."""
        return self._swap_split(buffers, to_experts=True)

    def from_experts(self, buffers: tf.Tensor) -> tf.Tensor:
        """`to_experts`' way back: the all-to-all to split by group again."""
        return self._swap_split(buffers, to_experts=False)

    def _swap_split(self, buffers: tf.Tensor, to_experts: bool) -> tf.Tensor:
        """Relayouts grouped buffers from split by group to split by expert over the
        expert axis (`to_experts`), or back.

        Through `[batch shards, expert shards, experts x groups x capacity x d]`, the
        experts outermost in the last axis: DTensor (TF 2.21) lowers a relayout between
        two other axes of a higher-rank tensor to an all-to-all that returns wrong values
        (tests/test_expert_sharding.py checks the values this way gives).
        """
        shape = buffers.shape.as_list()
        experts_outer = [0, 1, 3, 2, 4, 5]      # [B, Es, groups, E, ...] <-> [B, Es, E, groups, ...]
        flat = tf.reshape(tf.transpose(buffers, experts_outer), shape[:2] + [-1])
        by_group = self._layout([self.batch_axis, self.expert_axis, None])
        by_expert = self._layout([self.batch_axis, None, self.expert_axis])
        flat = _relayout_with_gradient(flat, by_group if to_experts else by_expert,
                                       by_expert if to_experts else by_group)
        swapped = tf.reshape(flat, [shape[i] for i in experts_outer])
        return tf.transpose(swapped, experts_outer)


def _relayout_with_gradient(values: tf.Tensor, source: dtensor.Layout,
                            target: dtensor.Layout) -> tf.Tensor:
    """`dtensor.relayout(values, target)` for `values` of layout `source`, whose gradient
    is pinned to `target` before it moves back to `source`: DTensor otherwise may lay the
    incoming gradient out replicated (seen with a batch axis of size 1), turning the
    backward all-to-all into an all-gather of every expert's buffers."""
    @tf.custom_gradient
    def relayout(values):
        def grad(d_values):
            return dtensor.relayout(dtensor.relayout(d_values, target), source)

        return dtensor.relayout(values, target), grad

    return relayout(values)


def is_expert_weight(variable) -> bool:
    """Whether `variable` (a Keras variable) is one of the stacked expert weights."""
    parts = variable.path.split("/")
    return len(parts) >= 2 and parts[-2] == "experts" and parts[-1] in EXPERT_WEIGHT_NAMES
