"""`DataParallel`: the default, mirrored and multi_worker placements (a tf.distribute
strategy, every weight on every replica)."""

from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from train.distribution.devices import is_chief
from train.distribution.placement import LossFn, Step, differentiated_loss
from train.distribution.replica_data import local_replica_slices, to_replicas


class DataParallel:
    """default, mirrored and multi_worker: a tf.distribute strategy, every weight on
    every replica. Implements `Placement`.

    Each replica runs the model on its slice of the global batch and differentiates
    `differentiated_loss` (its share of the global loss); the optimizer sums the
    replicas' gradients.
    """

    def __init__(self, strategy: tf.distribute.Strategy, *, name: str):
        self.strategy = strategy
        self.name = name
        self.is_chief = is_chief(strategy)

    def scope(self):
        return self.strategy.scope()

    def describe(self) -> str:
        return f"strategy {self.name} with {self.strategy.num_replicas_in_sync} replicas"

    def input(self, dataset: tf.data.Dataset) -> tf.data.Dataset:
        return local_replica_slices(dataset, self.strategy)

    def place(self, model: keras.Model, optimizer: keras.optimizers.Optimizer) -> None:
        with self.strategy.scope():
            optimizer.build(model.trainable_variables)

    def train_step(self, model, optimizer, loss_fn: LossFn) -> Step:
        variables = model.trainable_variables

        def replica_step(batch):
            context = tf.distribute.get_replica_context()
            with tf.GradientTape() as tape:
                _, nll_sum, num_tokens = loss_fn(model, batch, training=True)
                global_tokens = context.all_reduce(tf.distribute.ReduceOp.SUM, num_tokens)
                loss = differentiated_loss(nll_sum, global_tokens, model)
            optimizer.apply_gradients(zip(tape.gradient(loss, variables), variables))
            return nll_sum, num_tokens

        return _reduce_sum_step(self.strategy, replica_step)

    def eval_step(self, model, loss_fn: LossFn) -> Step:
        def replica_step(batch):
            _, nll_sum, num_tokens = loss_fn(model, batch, training=False)
            return nll_sum, num_tokens

        return _reduce_sum_step(self.strategy, replica_step)

    def to_host(self, value) -> np.ndarray:
        return np.asarray(value)

    def reset_metrics(self, layer: keras.layers.Layer) -> None:
        for metric in layer.metrics:
            metric.reset_state()

    def unplace(self, model: keras.Model) -> None:
        """Nothing to undo: the weights stay usable as they are."""


def _reduce_sum_step(strategy: tf.distribute.Strategy, replica_step: Callable) -> Step:
    """A tf.function: local replica slices -> replica_step's outputs summed over replicas."""
    def step(local_slices):
        batch = to_replicas(strategy, local_slices)
        per_replica = strategy.run(replica_step, args=(batch,))
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)
                for value in per_replica]

    # Batches vary in shape (length buckets): one trace for all of them.
    return tf.function(step, reduce_retracing=True)
