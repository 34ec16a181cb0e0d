"""`DataParallel`: the default, mirrored and multi_worker placements (a tf.distribute
strategy, every weight on every replica)."""

from typing import Callable

import keras
import numpy as np
import tensorflow as tf

from train.distribution.devices import is_chief
from train.distribution.placement import (LossFn, Step, apply_if_finite,
                                         differentiated_loss, nonfinite_flags)
from train.distribution.replica_data import local_replica_slices, to_replicas


class DataParallel:
    """default, mirrored and multi_worker: a tf.distribute strategy, every weight on
    every replica. Implements `Placement`.

    Each replica runs the model on its slice of the global batch and differentiates
    `differentiated_loss` (its share of the global loss); the optimizer sums the
    replicas' gradients.
    """

    def __init__(self, strategy: tf.distribute.Strategy, *, name: str,
                 jit_compile: bool = False):
        """`jit_compile`: compile the steps with XLA (one device: the default
        strategy)."""
        self.strategy = strategy
        self.name = name
        self.is_chief = is_chief(strategy)
        self.shards_checkpoints = False  # every worker holds the whole model
        self.jit_compile = jit_compile

    def scope(self):
        return self.strategy.scope()

    def describe(self) -> str:
        return (f"strategy {self.name} with {self.strategy.num_replicas_in_sync} replicas"
                + (", steps compiled with XLA" if self.jit_compile else ""))

    def input(self, dataset: tf.data.Dataset) -> tf.data.Dataset:
        return local_replica_slices(dataset, self.strategy)

    def place(self, model: keras.Model, optimizer: keras.optimizers.Optimizer) -> None:
        if self.jit_compile:
            _check_compilable(model)
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
            grads = tape.gradient(loss, variables)
            # Every replica skips the update if any replica's loss or gradient is not
            # finite (the optimizer would sum its NaN into everyone's gradient).
            nonfinite = context.all_reduce(tf.distribute.ReduceOp.SUM,
                                           nonfinite_flags(loss, grads))
            apply_if_finite(optimizer, grads, variables, tf.reduce_all(nonfinite == 0))
            return nll_sum, num_tokens, nonfinite

        return _reduce_sum_step(self.strategy, replica_step, self.jit_compile)

    def eval_step(self, model, loss_fn: LossFn) -> Step:
        def replica_step(batch):
            _, nll_sum, num_tokens = loss_fn(model, batch, training=False)
            return nll_sum, num_tokens

        return _reduce_sum_step(self.strategy, replica_step, self.jit_compile)

    def to_host(self, value) -> np.ndarray:
        return np.asarray(value)

    def reset_metrics(self, layer: keras.layers.Layer) -> None:
        for metric in layer.metrics:
            metric.reset_state()

    def unplace(self, model: keras.Model) -> None:
        """Nothing to undo: the weights stay usable as they are."""


def _check_compilable(model: keras.Model) -> None:
    """Refuses, naming the layer, a model with a layer that XLA cannot compile (the
    sparse MoE dispatch); Keras would only warn and fall back."""
    for layer in model._flatten_layers():
        if not getattr(layer, "supports_jit", True):
            raise ValueError(
                f"--jit_compile: layer {layer.name!r} cannot be compiled with XLA"
                + (" (dispatch='sparse' has dynamic shapes; --dispatch=capacity compiles)"
                   if getattr(layer, "dispatch", None) == "sparse" else "") + ".")


def _reduce_sum_step(strategy: tf.distribute.Strategy, replica_step: Callable,
                     jit_compile: bool = False) -> Step:
    """A tf.function: local replica slices -> replica_step's outputs summed over replicas."""
    def step(local_slices):
        batch = to_replicas(strategy, local_slices)
        per_replica = strategy.run(replica_step, args=(batch,))
        return [strategy.reduce(tf.distribute.ReduceOp.SUM, value, axis=None)
                for value in per_replica]

    # Batches vary in shape (length buckets): one trace for all of them.
    return tf.function(step, reduce_retracing=True, jit_compile=jit_compile)
