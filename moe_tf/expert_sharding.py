"""Expert parallelism with DTensor: each device of a mesh axis holds a share of the experts.

The paper's layout (Section 3.1): the ordinary layers are data parallel (batch split over
the mesh's batch axis, weights replicated) while each expert exists once, the experts
split over the expert axis. With the fixed-capacity dispatch the tokens move between the
two layouts by relayouts around the experts:

    gather_tokens     relayout: the batch-split tokens and their routing, replicated
    dispatch          gathers: [tokens, d] -> [experts, capacity, d] (replicated)
    to_experts        relayout: experts split over the expert axis (a slice: each device
                      then runs only its own experts against its own weight shards)
    experts           [experts, capacity, d] -> [experts, capacity, d_out]
    from_experts      relayout: replicated, for the combine
    split_tokens      relayout: the combined outputs split over the batch axis again

Every device gathers the whole batch and receives every expert's outputs: an all-gather
each way, not yet the paper's all-to-all (where each device sends each expert only its own
tokens).

`ExpertSharding` holds the mesh and answers which layout each weight gets; a layer uses it
through `SparselyGatedMoE.shard_experts`. It is a runtime placement, not part of a layer's
configuration: a saved or exported layer is always unplaced.
"""

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

    def gather_tokens(self, values: tf.Tensor) -> tf.Tensor:
        """Batch-split `[tokens, ...]` -> the same, replicated: the capacity dispatch's
        slot arithmetic (sorts, gathers, segment sums) runs on whole token arrays."""
        return dtensor.relayout(values, self.replicated(values.shape.rank))

    def split_tokens(self, values: tf.Tensor) -> tf.Tensor:
        """Replicated `[tokens, ...]` -> split over the batch axis again (a slice)."""
        return dtensor.relayout(values, self.batch_sharded(values.shape.rank))

    def to_experts(self, expert_inputs: tf.Tensor) -> tf.Tensor:
        """`[experts, capacity, d]` -> the same, experts split over the expert axis."""
        return dtensor.relayout(expert_inputs, self.expert_sharded(expert_inputs.shape.rank))

    def from_experts(self, expert_outputs: tf.Tensor) -> tf.Tensor:
        """`[experts, capacity, d_out]` -> the same, replicated."""
        return dtensor.relayout(expert_outputs, self.replicated(expert_outputs.shape.rank))


def is_expert_weight(variable) -> bool:
    """Whether `variable` (a Keras variable) is one of the stacked expert weights."""
    parts = variable.path.split("/")
    return len(parts) >= 2 and parts[-2] == "experts" and parts[-1] in EXPERT_WEIGHT_NAMES
