"""The experts: `num_experts` feed-forward networks d_in -> hidden (ReLU) -> d_out.

Parameters are stacked with a leading `num_experts` dimension, so one variable holds every
expert's kernel (the layout DTensor shards on the expert axis). Two ways to run them:
- grouped: tokens sorted by expert, `[assignments, d_in]`, with the number of tokens of
  each expert; each expert multiplies only its own rows (the dropless sparse path);
- batched: a fixed-capacity buffer `[experts, capacity, d_in]`, one batched einsum.
"""

from typing import Optional

import keras
import tensorflow as tf


def _per_expert_initializer(initializer, num_experts: int):
    """An initializer for `[experts, fan_in, fan_out]` kernels with per-expert fans.

    Keras's variance-scaling initializers count the leading axis as a receptive field and
    would shrink the variance `num_experts` times; scaling back gives each expert the
    variance it would get as a lone `[fan_in, fan_out]` Dense kernel.
    """
    initializer = keras.initializers.get(initializer)
    if isinstance(initializer, keras.initializers.VarianceScaling):
        return keras.initializers.VarianceScaling(
            scale=initializer.scale * num_experts, mode=initializer.mode,
            distribution=initializer.distribution, seed=initializer.seed)
    return initializer


def _grouped_feed_forward(inputs, group_sizes, kernel_in, bias_in, kernel_out, bias_out):
    """Each expert's FFN on its own contiguous block of rows.

    Args:
        inputs: `[assignments, d_in]`, rows sorted by expert.
        group_sizes: int32 `[experts]`, rows per expert (sums to `assignments`).
        kernel_in `[experts, d_in, hidden]`, bias_in `[experts, hidden]`,
        kernel_out `[experts, hidden, d_out]`, bias_out `[experts, d_out]`.

    Returns:
        `[assignments, d_out]`.

    A while loop keeps the graph the same size for 8 or 4096 experts. The gradient is
    written by hand: autodiff through a loop that slices the stacked kernels would add a
    dense `[experts, ...]` gradient on every iteration.
    """
    num_experts = tf.shape(kernel_in)[0]
    offsets = tf.concat([[0], tf.cumsum(group_sizes)], axis=0)
    d_out = kernel_out.shape[-1]
    hidden = kernel_in.shape[-1]

    def rows(tensor, e):
        return tensor[offsets[e]:offsets[e + 1]]

    def run_loop(body, outputs):
        """Runs body(e) -> tuple of tensors per expert; collects them in TensorArrays."""
        arrays = [tf.TensorArray(dtype, size=num_experts, infer_shape=False,
                                 element_shape=shape) for dtype, shape in outputs]

        def step(e, *arrays):
            values = body(e)
            return (e + 1,) + tuple(a.write(e, v) for a, v in zip(arrays, values))

        _, *arrays = tf.while_loop(lambda e, *_: e < num_experts, step, (0, *arrays))
        return arrays

    @tf.custom_gradient
    def forward(inputs, kernel_in, bias_in, kernel_out, bias_out):
        def expert(e):
            hidden_act = tf.nn.relu(tf.matmul(rows(inputs, e), kernel_in[e]) + bias_in[e])
            return (tf.matmul(hidden_act, kernel_out[e]) + bias_out[e], hidden_act)

        out_ta, hidden_ta = run_loop(
            expert, [(inputs.dtype, [None, d_out]), (inputs.dtype, [None, hidden])])
        activations = hidden_ta.concat()

        def grad(d_outputs):
            def expert_grad(e):
                x = rows(inputs, e)
                act = rows(activations, e)
                dy = rows(d_outputs, e)
                d_act = tf.matmul(dy, kernel_out[e], transpose_b=True)
                d_pre = tf.where(act > 0, d_act, tf.zeros_like(d_act))
                return (tf.matmul(d_pre, kernel_in[e], transpose_b=True),
                        tf.matmul(x, d_pre, transpose_a=True),
                        tf.reduce_sum(d_pre, axis=0),
                        tf.matmul(act, dy, transpose_a=True),
                        tf.reduce_sum(dy, axis=0))

            d_x, d_kin, d_bin, d_kout, d_bout = run_loop(expert_grad, [
                (inputs.dtype, [None, inputs.shape[-1]]),
                (kernel_in.dtype, kernel_in.shape[1:]),
                (bias_in.dtype, bias_in.shape[1:]),
                (kernel_out.dtype, kernel_out.shape[1:]),
                (bias_out.dtype, bias_out.shape[1:])])
            return (d_x.concat(), d_kin.stack(), d_bin.stack(), d_kout.stack(),
                    d_bout.stack())

        return out_ta.concat(), grad

    return forward(inputs, kernel_in, bias_in, kernel_out, bias_out)


@keras.saving.register_keras_serializable(package="moe_tf")
class FeedForwardExperts(keras.layers.Layer):
    """`num_experts` independent ReLU feed-forward networks with stacked weights.

    Weights: `kernel_in` `[experts, input_dim, hidden_size]`, `bias_in`
    `[experts, hidden_size]`, `kernel_out` `[experts, hidden_size, output_size]`,
    `bias_out` `[experts, output_size]`.
    """

    def __init__(self, *, num_experts: int, hidden_size: int, output_size: int,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 **kwargs):
        super().__init__(**kwargs)
        self.num_experts = num_experts
        self.hidden_size = hidden_size
        self.output_size = output_size
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def build(self, input_shape):
        input_dim = input_shape[-1]
        kernel_init = _per_expert_initializer(self.kernel_initializer, self.num_experts)
        self.kernel_in = self.add_weight(
            name="kernel_in", shape=(self.num_experts, input_dim, self.hidden_size),
            initializer=kernel_init)
        self.bias_in = self.add_weight(name="bias_in",
                                       shape=(self.num_experts, self.hidden_size),
                                       initializer=self.bias_initializer)
        self.kernel_out = self.add_weight(
            name="kernel_out", shape=(self.num_experts, self.hidden_size, self.output_size),
            initializer=kernel_init)
        self.bias_out = self.add_weight(name="bias_out",
                                        shape=(self.num_experts, self.output_size),
                                        initializer=self.bias_initializer)

    def call(self, inputs, *, group_sizes: Optional[tf.Tensor] = None):
        """Runs the experts.

        Args:
            inputs: `[assignments, input_dim]` sorted by expert when `group_sizes` is
                given (grouped), else `[experts, capacity, input_dim]` (batched).
            group_sizes: int32 `[experts]`, the rows of each expert in grouped mode.

        Returns:
            `[assignments, output_size]` or `[experts, capacity, output_size]`.
        """
        weights = [tf.convert_to_tensor(w) for w in
                   (self.kernel_in, self.bias_in, self.kernel_out, self.bias_out)]
        if group_sizes is not None:
            return _grouped_feed_forward(inputs, group_sizes, *weights)
        kernel_in, bias_in, kernel_out, bias_out = weights
        hidden = tf.nn.relu(tf.einsum("ecd,edh->ech", inputs, kernel_in)
                            + bias_in[:, None, :])
        return tf.einsum("ech,eho->eco", hidden, kernel_out) + bias_out[:, None, :]

    def get_config(self):
        config = super().get_config()
        config.update(num_experts=self.num_experts, hidden_size=self.hidden_size,
                      output_size=self.output_size,
                      kernel_initializer=keras.initializers.serialize(
                          self.kernel_initializer),
                      bias_initializer=keras.initializers.serialize(self.bias_initializer))
        return config
