"""`ExpertParallel`: the dtensor placement (the batch split over a mesh's "batch" axis,
the experts over its "expert" axis, every other weight replicated)."""

import contextlib
from typing import List

import keras
import numpy as np
import tensorflow as tf
from absl import logging
from tensorflow.experimental import dtensor

from models.projected_lstm import ProjectedLSTM
from moe_tf import SparselyGatedMoE
from moe_tf.expert_sharding import ExpertSharding, is_expert_weight
from train.distribution.devices import MESH_AXES
from train.distribution.placement import (LossFn, Step, differentiated_loss,
                                         nonfinite_flags)
from train.distribution.replica_data import local_replica_slices

# Under DTensor the LSTMs are unrolled and every batch shape compiles its own program;
# time is padded to a multiple of this to bound the number of shapes.
DTENSOR_LENGTH_MULTIPLE = 8


class ExpertParallel:
    """dtensor: the batch split over the mesh's "batch" axis, the experts over "expert".
    Implements `Placement`.

    `place` backs every variable of the model (weights, random-seed states, metric
    states) and of the optimizer with a DVariable: the experts' stacked weights and their
    optimizer slots split over "expert", everything else replicated. A step sees the
    global batch as one DTensor split over "batch": one program, one "replica", whose
    `differentiated_loss` is the global loss. Keras RNNs are unrolled while placed (the
    gradient of their while loop has no DTensor layout propagation), so each batch shape
    compiles a program of its own: time is padded to a multiple of
    `DTENSOR_LENGTH_MULTIPLE`, rows to a multiple of the mesh's devices (padding is id
    0, which every loss and layer masks).

    Found on TF 2.21 / Keras 3 (each silently wrong otherwise): the optimizer must be
    built eagerly after the weights are swapped and its variables swapped too; gradients
    must be relaid out to their weights' layouts; computing gradients and applying them
    must be separate tf.functions (a DVariable read right after an assign in the same
    function can return the old value).
    """

    def __init__(self, mesh: dtensor.Mesh):
        self.mesh = mesh
        self.sharding = ExpertSharding(mesh)
        self.is_chief = dtensor.client_id() == 0
        # With several clients each holds only its devices' shards of the experts: all
        # of them write the model checkpoint, each its shards, into one path.
        self.shards_checkpoints = True
        self._placed_variables: List[keras.Variable] = []
        self._rolled: List[keras.layers.RNN] = []

    def scope(self):
        return contextlib.nullcontext()

    def describe(self) -> str:
        axes = ",".join(f"{axis}:{self.mesh.dim_size(axis)}" for axis in MESH_AXES)
        return (f"strategy dtensor on mesh {axes} ({self.mesh.num_local_devices()} local "
                f"{self.mesh.device_type()} devices, {dtensor.num_clients()} client(s))")

    def input(self, dataset: tf.data.Dataset) -> tf.data.Dataset:
        # The one-device pipeline (one slice per global batch), so that the data position
        # in a checkpoint means the same under every placement.
        return local_replica_slices(dataset, tf.distribute.get_strategy())

    def place(self, model: keras.Model, optimizer: keras.optimizers.Optimizer) -> None:
        # ProjectedLSTM reverses time by gathers; any other backward RNN uses tf.reverse.
        reversed_by_gathers = {id(layer.lstm.backward_layer)
                               for layer in model._flatten_layers()
                               if isinstance(layer, ProjectedLSTM) and layer.bidirectional}
        for layer in model._flatten_layers():
            if (isinstance(layer, keras.layers.RNN) and layer.go_backwards
                    and id(layer) not in reversed_by_gathers):
                raise ValueError(
                    f"--strategy=dtensor: layer {layer.name!r} runs backwards in time "
                    f"with tf.reverse, which DTensor on TensorFlow 2.21 cannot lay out "
                    f"(ReverseV2). Use --strategy=mirrored or multi_worker for this model.")
        for layer in model._flatten_layers():
            if isinstance(layer, SparselyGatedMoE):
                layer.shard_experts(self.sharding)
            if isinstance(layer, keras.layers.RNN) and not layer.unroll:
                layer.unroll = True
                self._rolled.append(layer)
        for variable in _all_variables(model):
            layout = (self.sharding.weight_layout(variable) if variable.trainable
                      else self.sharding.replicated(len(variable.shape)))
            self._place_variable(variable, layout)
        # Built now, eagerly, over the DVariables: its slots are keyed by them.
        optimizer.build(model.trainable_variables)
        expert_prefixes = {weight.path.replace("/", "_") + "_": weight
                           for weight in model.trainable_variables if is_expert_weight(weight)}
        for variable in optimizer.variables:
            layout = self.sharding.replicated(len(variable.shape))
            for prefix, weight in expert_prefixes.items():
                # A slot of an expert weight ("<weight path>_momentum", a factored
                # moment...) keeps the experts on axis 0: split it like the weight.
                if (variable.name.startswith(prefix) and len(variable.shape)
                        and variable.shape[0] == weight.shape[0]):
                    layout = self.sharding.expert_sharded(len(variable.shape))
            self._place_variable(variable, layout)
        logging.info("DTensor mesh: %s", self.describe())
        for variable in model.trainable_variables + optimizer.variables:
            if self.layout_of(variable).sharding_specs[:1] == [self.sharding.expert_axis]:
                logging.info("  %s %s layout %s, shard per device %s",
                             getattr(variable, "path", variable.name), tuple(variable.shape),
                             self.layout_of(variable).sharding_specs,
                             self.shard_shapes(variable)[0])

    def _place_variable(self, variable: keras.Variable, layout: dtensor.Layout) -> None:
        value = _storage(variable).read_value()
        _back_with_dvariable(variable, self.to_dtensor(value, layout))
        self._placed_variables.append(variable)

    def to_dtensor(self, value: tf.Tensor, layout: dtensor.Layout) -> tf.Tensor:
        """A one-device tensor as a DTensor with `layout` on this placement's mesh."""
        on_mesh = dtensor.copy_to_mesh(value, self.sharding.replicated(value.shape.rank))
        return dtensor.relayout(on_mesh, layout)

    def layout_of(self, variable) -> dtensor.Layout:
        """The layout of a placed variable."""
        return dtensor.fetch_layout(_storage(variable))

    def shards(self, variable) -> List[tf.Tensor]:
        """A placed variable's component on each local device, in device order."""
        return dtensor.unpack(_storage(variable).read_value())

    def shard_shapes(self, variable) -> List[tuple]:
        """The shape of `variable`'s component on each local device, in device order."""
        return [tuple(shard.shape) for shard in self.shards(variable)]

    def global_value(self, variable) -> np.ndarray:
        """A placed variable's global value."""
        return self.to_host(_storage(variable).read_value())

    def _global_batch(self, local_slices):
        """The pipeline's one slice `[1, rows, time]` (or a tuple of them) -> a DTensor
        `[rows', time']` split over "batch", padded as the class docstring says."""
        def place(tensor):
            tensor = tensor[0]
            rows, length = tensor.shape[0], tensor.shape[1]
            # Each device routes its own share of the tokens (ExpertSharding.group_tokens).
            multiple = self.sharding.num_batch_shards * self.sharding.num_expert_shards
            padding = [[0, -rows % multiple], [0, -length % DTENSOR_LENGTH_MULTIPLE]]
            padding += [[0, 0]] * (tensor.shape.rank - 2)
            tensor = tf.pad(tensor, padding)
            return self.to_dtensor(tensor, self.sharding.batch_sharded(tensor.shape.rank))

        return tf.nest.map_structure(place, local_slices)

    def train_step(self, model, optimizer, loss_fn: LossFn) -> Step:
        variables = model.trainable_variables
        layouts = [self.sharding.weight_layout(v) for v in variables]

        @tf.function
        def gradients(batch):
            with tf.GradientTape() as tape:
                _, nll_sum, num_tokens = loss_fn(model, batch, training=True)
                # The whole batch is in this one program: its token count is global.
                loss = differentiated_loss(nll_sum, num_tokens, model)
            grads = tape.gradient(loss, variables)
            return [dtensor.relayout(g, layout) for g, layout in zip(grads, layouts)], \
                nll_sum, num_tokens, nonfinite_flags(loss, grads)

        @tf.function
        def apply(grads):
            optimizer.apply_gradients(zip(grads, variables))

        def step(local_slices):
            grads, nll_sum, num_tokens, nonfinite = gradients(
                self._global_batch(local_slices))
            nonfinite = self.to_host(nonfinite)
            if not nonfinite.any():  # else the update is skipped
                apply(grads)
            return self.to_host(nll_sum), self.to_host(num_tokens), nonfinite

        return step

    def eval_step(self, model, loss_fn: LossFn) -> Step:
        @tf.function
        def sums(batch):
            _, nll_sum, num_tokens = loss_fn(model, batch, training=False)
            return nll_sum, num_tokens

        def step(local_slices):
            return tuple(self.to_host(value)
                         for value in sums(self._global_batch(local_slices)))

        return step

    def to_host(self, value) -> np.ndarray:
        """The global value of a DTensor as a NumPy array."""
        layout = dtensor.fetch_layout(value)
        if not layout.is_fully_replicated():
            value = dtensor.relayout(value, self.sharding.replicated(layout.rank))
        return dtensor.unpack(value)[0].numpy()

    def reset_metrics(self, layer: keras.layers.Layer) -> None:
        # Keras assigns host zeros; a DVariable takes only DTensors (beyond scalars).
        for variable in layer.metrics_variables:
            variable.assign(self.to_dtensor(tf.zeros(variable.shape, variable.dtype),
                                             self.layout_of(variable)))

    def unplace(self, model: keras.Model) -> None:
        """Back to ordinary one-device variables (for decoding, serving and export)."""
        for variable in self._placed_variables:
            _back_with_tf_variable(variable, self.global_value(variable))
        self._placed_variables = []
        for layer in model._flatten_layers():
            if isinstance(layer, SparselyGatedMoE):
                layer.shard_experts(None)
        for layer in self._rolled:
            layer.unroll = False
        self._rolled = []


def _all_variables(model: keras.Model) -> List[keras.Variable]:
    """Weights, random-seed states and metric states of `model`, each once."""
    seen, result = set(), []
    candidates = list(model.variables) + [
        v for layer in model._flatten_layers() for v in layer.metrics_variables]
    for variable in candidates:
        if id(variable) not in seen:
            seen.add(id(variable))
            result.append(variable)
    return result


# Why the private attribute: a Keras 3 variable (TensorFlow backend) keeps its storage in
# `_value`, a tf.Variable through which every read, assign and checkpoint of the Keras
# variable goes. Keras offers no public way to give a variable a DTensor layout (a layout
# passed to `add_weight` is ignored on this backend), so placing a model replaces that
# storage, keeping the Keras variable (and everything holding it: layers, optimizer
# slots, checkpoints) as it is. The two functions below are the only writes of `_value`.


def _storage(variable: keras.Variable) -> tf.Variable:
    """The tf.Variable (or DVariable) behind a Keras variable."""
    return variable._value


def _back_with_dvariable(variable: keras.Variable, value: tf.Tensor) -> None:
    """Makes a DVariable holding the DTensor `value` the storage of `variable`."""
    old = _storage(variable)
    variable._value = dtensor.DVariable(value, trainable=old.trainable,
                                        name=old.name.split(":")[0])


def _back_with_tf_variable(variable: keras.Variable, value: np.ndarray) -> None:
    """Makes an ordinary tf.Variable holding `value` the storage of `variable` again."""
    old = _storage(variable)
    variable._value = tf.Variable(value, trainable=old.trainable,
                                  name=old.name.split(":")[0])
