"""What the training loop asks of a placement, and the loss every placement differentiates.

A placement puts a model and its optimizer on devices and provides the compiled training
and evaluation steps. `Placement` is the interface `train.training.loop.Trainer` uses; the
implementations are `DataParallel` (tf.distribute strategies) and `ExpertParallel`
(DTensor).
"""

from typing import Any, Callable, ContextManager, Protocol, Tuple

import keras
import numpy as np
import tensorflow as tf

# `loss_fn(model, batch, training) -> (mean_loss, nll_sum, num_tokens)`, supplied by a
# task: the NLL summed over the batch's real (non-padding) tokens, and their count.
LossFn = Callable[[keras.Model, Any, bool], Tuple[tf.Tensor, tf.Tensor, tf.Tensor]]
# `step(local_slices) -> (nll_sum, num_tokens)` summed over the global batch (a
# training step also returns `nonfinite`, see `nonfinite_flags`).
Step = Callable[[Any], Tuple[Any, ...]]


class Placement(Protocol):
    """How the training loop runs a model on devices.

    The loop creates the model and optimizer under `scope()`, calls `place` once, feeds
    the steps with batches from `input(dataset)`, reads their results with `to_host`, and
    calls `unplace` when training is over (before decoding, serving and export).
    """

    is_chief: bool
    """Whether this process writes checkpoints, summaries, metrics and exports."""
    shards_checkpoints: bool
    """Whether every process writes its own shards of the model into the one checkpoint
    (in the shared `--model_dir`), rather than the chief writing it whole."""

    def scope(self) -> ContextManager:
        """The context in which the model and optimizer are created."""

    def describe(self) -> str:
        """One line for the log: the strategy or mesh and its replicas or devices."""

    def input(self, dataset: tf.data.Dataset) -> tf.data.Dataset:
        """Global batches -> what this process's steps take (its replicas' slices)."""

    def place(self, model: keras.Model, optimizer: keras.optimizers.Optimizer) -> None:
        """Puts the (built) model's and optimizer's variables on the devices; builds the
        optimizer."""

    def train_step(self, model: keras.Model, optimizer: keras.optimizers.Optimizer,
                   loss_fn: LossFn) -> Step:
        """A step that applies the gradient of `differentiated_loss` over the global
        batch and returns `(nll_sum, num_tokens, nonfinite)`: the sums over it, and
        `nonfinite_flags` of the loss and gradients (non-zero where any replica's was
        NaN or Inf). A step with a non-zero flag changes no variable: its update is
        skipped and the optimizer's step count stays where it was."""

    def eval_step(self, model: keras.Model, loss_fn: LossFn) -> Step:
        """A step that returns `(nll_sum, num_tokens)` over the global batch, no
        training."""

    def to_host(self, value) -> np.ndarray:
        """A step's result or a metric's value as a NumPy array (its global value)."""

    def reset_metrics(self, layer: keras.layers.Layer) -> None:
        """Resets the metrics of `layer` (e.g. an MoE layer's balance statistics)."""

    def unplace(self, model: keras.Model) -> None:
        """Leaves the model's weights usable by ordinary one-device code."""


def differentiated_loss(nll_sum: tf.Tensor, global_tokens: tf.Tensor,
                        model: keras.Model) -> tf.Tensor:
    """The loss one replica differentiates in a training step, under every placement.

    The gradients of the replicas are summed (tf.distribute sums them when the optimizer
    applies them; a DTensor step is a single program over the global batch, one
    "replica"), so each replica's loss is its share of the global loss:

    - the NLL: the replica's `nll_sum` over the GLOBAL count of real tokens, so that the
      shares add up to the global mean;
    - the layers' auxiliary losses (`model.losses`, e.g. the MoE balancing loss): a layer
      adds the auxiliary loss of the GLOBAL batch on every replica (`SparselyGatedMoE`
      all-reduces Importance and Load over the tf.distribute replicas), so each replica
      takes 1 / replicas of it. `tf.nn.scale_regularization_loss` divides by the
      current strategy's `num_replicas_in_sync`: the replica count inside a
      tf.distribute replica function, and 1 under the default strategy and under DTensor,
      whose program already sees the global batch.

    Call it inside the replica function, where the forward pass that filled
    `model.losses` ran.
    """
    loss = nll_sum / tf.maximum(global_tokens, 1.0)
    if model.losses:
        loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
    return loss


def nonfinite_flags(loss: tf.Tensor, grads) -> tf.Tensor:
    """float32 `[1 + len(grads)]`: 1 where the loss (first) or a gradient (in the order
    of `grads`; a None gradient counts as finite) holds a NaN or an Inf, else 0."""
    values = [loss] + [g.values if isinstance(g, tf.IndexedSlices) else g for g in grads]
    return tf.stack([
        0.0 if value is None else
        tf.cast(tf.logical_not(tf.reduce_all(tf.math.is_finite(value))), tf.float32)
        for value in values])


def apply_if_finite(optimizer: keras.optimizers.Optimizer, grads, variables,
                    finite: tf.Tensor) -> None:
    """`optimizer.apply_gradients` when the scalar `finite` holds, else nothing.

    Call it in a replica context with `finite` equal on every replica. Where the
    strategy aggregates gradients by `merge_call` (the default and mirrored ones), the
    condition has to be taken in the cross-replica context: a `merge_call` inside a
    replica's `tf.cond` is refused (as Keras's LossScaleOptimizer also does it).
    """
    def apply(grads):
        optimizer.apply_gradients(zip(grads, variables))

    if tf.__internal__.distribute.strategy_supports_no_merge_call():
        tf.cond(finite, lambda: apply(grads), lambda: None)
        return

    def in_cross_replica_context(strategy, grads, finite):
        finite = strategy.experimental_local_results(finite)[0]
        tf.cond(finite,
                lambda: strategy.extended.call_for_each_replica(apply, args=(grads,)),
                lambda: None)

    tf.distribute.get_replica_context().merge_call(in_cross_replica_context,
                                                   args=(grads, finite))
