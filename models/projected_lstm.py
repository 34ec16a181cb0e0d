"""An LSTM layer whose outputs are projected down, as GNMT's wide LSTMs are."""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="moe_tf")
class ProjectedLSTM(keras.layers.Layer):
    """An LSTM of `units` whose outputs are projected to `output_dim` (no projection when
    they are equal). Bidirectional: `units // 2` per direction, outputs concatenated.

    `call`: `[batch, time, input_dim]` -> `[batch, time, output_dim]`. `step` runs one
    time step of a unidirectional layer, for decoding.
    """

    def __init__(self, *, units: int, output_dim: int, bidirectional: bool = False,
                 **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.output_dim = output_dim
        self.bidirectional = bidirectional
        self.supports_masking = True
        policy = self.dtype_policy
        if bidirectional:
            self.lstm = keras.layers.Bidirectional(
                keras.layers.LSTM(units // 2, return_sequences=True, dtype=policy),
                dtype=policy, name="lstm")
            self.lstm_output_dim = 2 * (units // 2)
        else:
            self.lstm = keras.layers.LSTM(units, return_sequences=True, dtype=policy,
                                          name="lstm")
            self.lstm_output_dim = units
        self.projection = (None if self.lstm_output_dim == output_dim else
                           keras.layers.Dense(output_dim, use_bias=False, dtype=policy,
                                              name="projection"))

    def build(self, input_shape):
        self.lstm.build(input_shape)
        if self.projection is not None:
            self.projection.build(tuple(input_shape[:-1]) + (self.lstm_output_dim,))

    def call(self, inputs, *, training=None, mask=None):
        if self.bidirectional:
            outputs = self._both_directions(inputs, training=training, mask=mask)
        else:
            outputs = self.lstm(inputs, training=training, mask=mask)
        return outputs if self.projection is None else self.projection(outputs)

    def _both_directions(self, inputs, *, training, mask):
        """What `self.lstm` (a Keras Bidirectional, concatenating) computes, with the time
        reversals done by gathers: DTensor (TF 2.21) cannot lay out `tf.reverse`, which
        the Bidirectional and its backward LSTM use. The backward LSTM runs forward over
        the reversed sequence and mask, which is how Keras runs `go_backwards`."""
        forward = self.lstm.forward_layer(inputs, training=training, mask=mask)
        backward_layer = self.lstm.backward_layer
        backward_layer.go_backwards = False
        try:
            backward = backward_layer(_reverse_time(inputs), training=training,
                                      mask=None if mask is None else _reverse_time(mask))
        finally:
            backward_layer.go_backwards = True
        return tf.concat([tf.cast(forward, self.compute_dtype),
                          _reverse_time(tf.cast(backward, self.compute_dtype))], axis=-1)

    def initial_state(self, batch_size):
        """Zero `[h, c]`, each `[batch_size, units]`."""
        return [tf.zeros([batch_size, self.units], self.compute_dtype)] * 2

    def step(self, inputs, state):
        """One step at inference: `[batch, input_dim]`, `[h, c]` -> output, new state."""
        outputs, state = self.lstm.cell(inputs, state, training=False)
        return (outputs if self.projection is None else self.projection(outputs)), state

    def get_config(self):
        return {**super().get_config(), "units": self.units, "output_dim": self.output_dim,
                "bidirectional": self.bidirectional}


def _reverse_time(values: tf.Tensor) -> tf.Tensor:
    """`[batch, time, ...]` with time reversed (a gather)."""
    length = tf.shape(values)[1]
    return tf.gather(values, tf.range(length - 1, -1, -1), axis=1)
