"""The attention of the paper's translation model (Appendix E)."""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="moe_tf")
class TanhProductAttention(keras.layers.Layer):
    """The paper's attention, A(x_i, y_j) = sum_d V_d tanh((x_i U)_d) tanh((y_j W)_d).

    As matrix products: keys K = tanh(X U) `[batch, source, units]` (once per sentence),
    queries Q = tanh(Y W) * V `[batch, target, units]`, scores Q K^T, a softmax over the
    real (unmasked) source positions, and the context is the weighted sum of X.

    Weights: `U` `[memory_dim, units]`, `W` `[query_dim, units]`, `V` `[units]`.
    """

    def __init__(self, *, units: int, **kwargs):
        super().__init__(**kwargs)
        if units < 1:
            raise ValueError(f"TanhProductAttention: `units` must be >= 1; got {units}.")
        self.units = units

    def build(self, input_shape):
        query_shape, memory_shape = input_shape
        self.U = self.add_weight(name="U", shape=(memory_shape[-1], self.units),
                                 initializer="glorot_uniform")
        self.W = self.add_weight(name="W", shape=(query_shape[-1], self.units),
                                 initializer="glorot_uniform")
        self.V = self.add_weight(name="V", shape=(self.units,),
                                 initializer="glorot_uniform")

    def keys(self, memory):
        """`[batch, source, memory_dim]` -> tanh(X U) `[batch, source, units]`."""
        return tf.tanh(tf.matmul(memory, self.U))

    def attend(self, queries, memory, keys, memory_mask=None, return_weights=False):
        """Context `[batch, target, memory_dim]` (and weights `[batch, target, source]`)
        from queries `[batch, target, query_dim]` and precomputed `keys(memory)`."""
        q = tf.tanh(tf.matmul(queries, self.W)) * self.V
        scores = tf.matmul(q, keys, transpose_b=True)                  # [B, T, S]
        if memory_mask is not None:
            # Padding gets no weight: its score is the lowest the dtype holds.
            scores = tf.where(memory_mask[:, None, :], scores, scores.dtype.min)
        weights = tf.nn.softmax(scores, axis=-1)
        context = tf.matmul(weights, memory)
        return (context, weights) if return_weights else context

    def call(self, inputs, *, memory_mask=None, return_weights=False):
        """inputs: (queries `[batch, target, query_dim]`, memory `[batch, source,
        memory_dim]`); memory_mask: bool `[batch, source]`, False at padding."""
        queries, memory = inputs
        return self.attend(queries, memory, self.keys(memory), memory_mask,
                           return_weights)

    def get_config(self):
        return {**super().get_config(), "units": self.units}
