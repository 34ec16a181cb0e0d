"""The experts: `num_experts` feed-forward networks d_in -> hidden (ReLU) -> d_out.

Parameters are stacked with a leading `num_experts` dimension, so one variable holds every
expert's kernel (the layout DTensor shards on the expert axis). Two ways to run them:
- grouped: tokens sorted by expert, `[rows, d_in]`, with the number of rows of each
  expert; each expert multiplies only its own rows (the dropless sparse path);
- batched: a fixed-capacity buffer `[experts, capacity, d_in]`, one batched einsum.
"""

from typing import Optional

import keras
import tensorflow as tf

from moe_tf import kernels


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


def _write_in_place(buffer: tf.Tensor, index, value: tf.Tensor) -> tf.Tensor:
    """`buffer[index] = value` along the first axis, in place; returns `buffer`.

    InplaceUpdate aliases its input. That is safe for the buffers of
    `_grouped_feed_forward`: each is a fresh tensor (an `Empty` op's, or a gather's)
    that nothing else reads before the write.
    """
    return tf.raw_ops.InplaceUpdate(x=buffer, i=index, v=value)


# Below this many rows per expert, small-matmul overheads dominate and the backward pass
# batches the experts over padded groups (see `_pad_to_batch`).
_SMALL_BLOCK_ROWS = 128


def _times_transposed(rows: tf.Tensor, weight: tf.Tensor) -> tf.Tensor:
    """rows @ weight^T, `[n, b] x [a, b] -> [n, a]`.

    As a batched matmul of one: oneDNN's MatMul with transpose_b repacks the weight on
    every call. Measured on the benchmark's expert shapes (a, b = 512, 1024; float32;
    2 cores; loops over the experts' blocks), BatchMatMulV2 with adj_y was the fastest
    at every block size: against transpose_b 1.35x faster at 2048 rows, 1.4x at 256,
    3x at 32; it also beat (weight @ rows^T)^T (by 8-31%) and an explicit transposed
    copy of the weight (by 1-29%).
    """
    return tf.raw_ops.BatchMatMulV2(x=rows[None], y=weight[None], adj_y=True)[0]


def _pad_to_batch(group_sizes: tf.Tensor, num_rows) -> tf.Tensor:
    """Whether the grouped backward pass over `num_rows` rows should pad the groups and
    batch the experts.

    True when every group is smaller than `_SMALL_BLOCK_ROWS` (per-expert matmuls are
    then dominated by per-call overhead and the copies of kernel gradients into place)
    and padding at most doubles the rows (it costs memory and FLOPs in proportion, and
    a skewed routing, one expert with most rows, must not blow it up).
    Measured crossover on the benchmark shapes: about 128 rows per expert.
    Never without rows (an empty batch): unfilled slots gather row 0.
    """
    largest = tf.reduce_max(group_sizes)
    return tf.logical_and(
        tf.logical_and(num_rows > 0, largest < _SMALL_BLOCK_ROWS),
        largest * tf.size(group_sizes) <= 2 * tf.reduce_sum(group_sizes))


# What gathering one expert's two kernels for the overflow pass costs, in padded rows of
# the batched backward pass: a copy of 2 d h floats (read and written) against the
# 4 x 2 d h FLOPs of a row, so 2 x (FLOP rate) / (copy bandwidth); about 60 here.
_OVERFLOW_EXPERT_ROWS = 64


def _split_capacity(group_sizes: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """How the padded backward pass splits the groups: (capacity, overflow capacity).

    The first pass pads every group to `capacity` rows, the second pads the rest of each
    larger group to `overflow capacity` = largest - capacity rows. The capacity (at least
    1) minimises experts x capacity + overflowing experts x (`_OVERFLOW_EXPERT_ROWS` +
    overflow capacity): at E = 512 and 32 rows per expert the largest group has about 53
    rows; a capacity of about 43 leaves about a dozen experts for the second pass.
    """
    largest = tf.reduce_max(group_sizes)
    capacity = tf.range(1, tf.maximum(largest, 1) + 1)                 # candidates
    overflowing = tf.reduce_sum(
        tf.cast(group_sizes[None, :] > capacity[:, None], tf.int32), axis=1)
    cost = (tf.size(group_sizes) * capacity
            + overflowing * (_OVERFLOW_EXPERT_ROWS + largest - capacity))
    best = tf.gather(capacity, tf.argmin(cost, output_type=tf.int32))
    return best, tf.maximum(largest - best, 0)


# Up to this many rows per expert on average the compiled kernels beat the TensorFlow
# path (experts' FFN forward and backward, float32, d = 512, h = 1024, 16384 rows, 2 cores;
# ad hoc, ranges over runs): 32 rows 372 against 493-514 ms, 256 rows 263-272 against
# 288-306, 1024 rows 259-263 against 275-310, 2048 rows 251-263 against 269-290; at 4096
# rows (4 experts for 2 threads) they are even, 273-278 against 274-276.
_COMPILED_KERNEL_ROWS = 2048


def _compiled_kernels_for(inputs, kernel_in, kernel_out):
    """The compiled kernels' ops for these operands (`kernels.op_library_for`, and every
    width a multiple of 16), or None."""
    widths = (inputs.shape[-1], kernel_in.shape[-1], kernel_out.shape[-1])
    if any(w is None or w % 16 for w in widths):
        return None
    return kernels.op_library_for(inputs, kernel_in, kernel_out)


def _cond(pred, true_fn, false_fn):
    """tf.cond, or just the branch when `pred` is a Python bool: a loop inside a cond
    branch misses Grappler's loop optimisations."""
    if isinstance(pred, bool):
        return true_fn() if pred else false_fn()
    return tf.cond(pred, true_fn, false_fn)


def _grouped_feed_forward(inputs, group_sizes, kernel_in, bias_in, kernel_out, bias_out,
                          *, recompute_activations: bool = False,
                          compiled_kernels: bool = False):
    """Each expert's FFN on its own contiguous block of rows.

    Args:
        inputs: `[rows, d_in]`, sorted by expert: the first `group_sizes[0]` rows are
            expert 0's, and so on; rows after the last group are padding.
        group_sizes: int32 `[experts]`, rows per expert (sums to at most `rows`).
        kernel_in `[experts, d_in, hidden]`, bias_in `[experts, hidden]`,
        kernel_out `[experts, hidden, d_out]`, bias_out `[experts, d_out]`.
        recompute_activations: keep no `[rows, hidden]` activations for the backward
            pass, which recomputes them (one more matmul per expert).
        compiled_kernels: run the experts with the compiled kernels of `moe_tf.kernels`
            when they are built and suit the operands, and the experts average at most
            `_COMPILED_KERNEL_ROWS` rows (with more, oneDNN's large matmuls are faster).

    Returns:
        `[rows, d_out]`, zeros for the padding rows (which get zero gradients too).

    One `tf.while_loop` iteration per expert keeps the graph the same size for 8 or 4096
    experts. The gradient is written by hand: autodiff through a loop that slices the
    stacked kernels would add a dense `[experts, ...]` gradient on every iteration. It
    loops over the experts too, unless the groups are small enough to pad to the largest
    and run as batched matmuls (`_pad_to_batch`).
    """
    num_experts = tf.shape(kernel_in)[0]
    ops = _compiled_kernels_for(inputs, kernel_in, kernel_out) if compiled_kernels else None
    offsets = tf.concat([[0], tf.cumsum(group_sizes)], axis=0)
    padding_rows = tf.shape(inputs)[0] - offsets[-1]

    def for_each_expert(body, row_outputs, expert_outputs):
        """Runs `body(e, begin, end)` for every expert e, the rows [begin, end) its own.

        `body` returns a block `[end - begin, width]` for each (dtype, width) of
        `row_outputs` and expert e's slice for each (dtype, shape) of `expert_outputs`.
        Returns the blocks concatenated, `[rows, width]` (zeros for the padding rows), and
        the slices stacked, `[experts, ...]`.

        Row blocks go through TensorArrays: a write keeps a reference and the final
        concat is one parallel copy (writing rows in place is slower: InplaceUpdate copies
        row by row). The per-expert slices (the kernel gradients) are written in place,
        so that each stacked gradient (1 GiB per kernel at 512 experts of the paper's
        size) exists once: TensorArray.stack would hold it twice, and a scatter would copy
        the whole buffer on every write.
        """
        arrays = [tf.TensorArray(dtype, size=num_experts + 1, infer_shape=False,
                                 element_shape=[None, width])
                  for dtype, width in row_outputs]
        buffers = [tf.raw_ops.Empty(shape=shape, dtype=dtype)
                   for dtype, shape in expert_outputs]

        def step(e, arrays, buffers):
            blocks, slices = body(e, offsets[e], offsets[e + 1])
            return (e + 1, [a.write(e, block) for a, block in zip(arrays, blocks)],
                    [_write_in_place(b, [e], s[None]) for b, s in zip(buffers, slices)])

        _, arrays, buffers = tf.while_loop(lambda e, *_: e < num_experts, step,
                                           (0, arrays, buffers))
        arrays = [a.write(num_experts, tf.zeros([padding_rows, width], dtype))
                  for a, (dtype, width) in zip(arrays, row_outputs)]
        return [a.concat() for a in arrays], buffers

    def hidden_of(x, e):
        return tf.nn.relu(tf.matmul(x, kernel_in[e]) + bias_in[e])

    @tf.custom_gradient
    def forward(inputs, kernel_in, bias_in, kernel_out, bias_out):
        def expert(e, begin, end):
            act = hidden_of(inputs[begin:end], e)
            out = tf.matmul(act, kernel_out[e]) + bias_out[e]
            return ([out] if recompute_activations else [out, act]), []

        dtype = inputs.dtype

        def looped_forward():
            """`[rows, d_out]` and the kept activations, `[rows, hidden]` (or no rows)."""
            row_outputs = [(dtype, kernel_out.shape[-1])]
            if not recompute_activations:
                row_outputs.append((dtype, kernel_in.shape[-1]))
            (outputs, *stored), _ = for_each_expert(expert, row_outputs, [])
            return outputs, (stored[0] if stored else tf.zeros([0, kernel_in.shape[-1]],
                                                               dtype))

        if ops is None:
            outputs, hidden = looped_forward()
        else:
            # A Python bool when the shapes are static, else decided at run time.
            rows = inputs.shape[0] if inputs.shape[0] is not None else tf.shape(inputs)[0]
            experts = kernel_in.shape[0] if kernel_in.shape[0] is not None else num_experts
            few_rows = rows <= _COMPILED_KERNEL_ROWS * experts
            outputs, hidden = _cond(
                few_rows,
                lambda: tuple(ops.moe_grouped_feed_forward(
                    inputs, group_sizes, kernel_in, bias_in, kernel_out, bias_out,
                    keep_hidden=not recompute_activations)),
                looped_forward)
        stored = [] if recompute_activations else [hidden]

        def looped_grad(d_outputs):
            def expert_grad(e, begin, end):
                x = inputs[begin:end]
                dy = d_outputs[begin:end]
                act = stored[0][begin:end] if stored else hidden_of(x, e)
                d_pre = tf.raw_ops.ReluGrad(gradients=_times_transposed(dy, kernel_out[e]),
                                            features=act)
                return ([_times_transposed(d_pre, kernel_in[e])],
                        [tf.matmul(x, d_pre, transpose_a=True),
                         tf.raw_ops.BiasAddGrad(out_backprop=d_pre),
                         tf.matmul(act, dy, transpose_a=True),
                         tf.raw_ops.BiasAddGrad(out_backprop=dy)])

            weights = (kernel_in, bias_in, kernel_out, bias_out)
            (d_inputs,), d_weights = for_each_expert(
                expert_grad, [(dtype, inputs.shape[-1])],
                [(w.dtype, tf.shape(w)) for w in weights])
            return (d_inputs, *d_weights)

        def batched_grad(d_outputs, row_of_slot, filled, k_in, b_in, k_out):
            """The backward pass of the experts whose rows `row_of_slot` (`[experts,
            slots]`, of the sorted rows; `filled` marks the real ones) gathers, with
            those experts' weights `k_in`, `b_in`, `k_out`: batched matmuls.

            Returns d rows `[experts, slots, d_in]` and the experts' weight gradients.
            Unfilled slots repeat some row and get zero gradients (their `dy` is
            masked), so they add nothing.
            """
            x = tf.gather(inputs, row_of_slot)                      # [experts, slots, d_in]
            dy = tf.gather(d_outputs, row_of_slot) * tf.cast(filled, dtype)[..., None]
            if stored:
                act = tf.gather(stored[0], row_of_slot)
            else:
                act = tf.nn.relu(tf.matmul(x, k_in) + b_in[:, None, :])
            d_pre = tf.raw_ops.ReluGrad(
                gradients=tf.matmul(dy, k_out, transpose_b=True), features=act)
            return (tf.matmul(d_pre, k_in, transpose_b=True),
                    tf.matmul(x, d_pre, transpose_a=True), tf.reduce_sum(d_pre, axis=1),
                    tf.matmul(act, dy, transpose_a=True), tf.reduce_sum(dy, axis=1))

        def padded_grad(d_outputs):
            """The backward pass as batched matmuls over padded groups, in two passes.

            With few rows per expert, one batched matmul beats a loop of small ones, and
            the kernel gradients come out stacked, with no per-expert copy into place.
            The first pass takes the first `capacity` rows of every group, the second the
            rest of the few larger groups, with those experts' weights gathered; its
            weight gradients are added in place (`_split_capacity` chooses the split).
            """
            def slots(first_rows, counts, width):
                """`[groups, width]` slots: the row of each (0 where unfilled), filled."""
                slot = tf.range(width)[None, :]
                filled = slot < counts[:, None]
                return tf.where(filled, first_rows[:, None] + slot, 0), filled

            capacity, overflow_capacity = _split_capacity(group_sizes)
            row_of_slot, filled = slots(offsets[:-1], group_sizes, capacity)
            d_x, *d_weights = batched_grad(d_outputs, row_of_slot, filled,
                                           kernel_in, bias_in, kernel_out)

            overflowing = tf.cast(tf.where(group_sizes > capacity)[:, 0], tf.int32)
            row_of_slot, filled_over = slots(
                tf.gather(offsets, overflowing) + capacity,
                tf.gather(group_sizes, overflowing) - capacity, overflow_capacity)
            d_x_over, *d_weights_over = batched_grad(
                d_outputs, row_of_slot, filled_over, tf.gather(kernel_in, overflowing),
                tf.gather(bias_in, overflowing), tf.gather(kernel_out, overflowing))
            # In place: each gradient is a fresh matmul or sum output read by nothing else.
            d_weights = [tf.raw_ops.InplaceAdd(x=d, i=overflowing, v=d_over)
                         for d, d_over in zip(d_weights, d_weights_over)]

            # Back to the sorted rows: every row from its first-pass slot (clipped for
            # the overflow rows), then the overflow rows written over, in place.
            expert_of_row = tf.repeat(tf.range(num_experts), group_sizes)
            position = tf.range(offsets[-1]) - tf.gather(offsets, expert_of_row)
            d_rows = tf.gather(tf.reshape(d_x, [-1, inputs.shape[-1]]),
                               expert_of_row * capacity + tf.minimum(position, capacity - 1))
            d_rows = _write_in_place(d_rows, tf.boolean_mask(row_of_slot, filled_over),
                                    tf.boolean_mask(d_x_over, filled_over))
            return (tf.pad(d_rows, [[0, padding_rows], [0, 0]]), *d_weights)

        def grad(d_outputs):
            def tensorflow_grad():
                return tf.cond(_pad_to_batch(group_sizes, tf.shape(inputs)[0]),
                               lambda: padded_grad(d_outputs),
                               lambda: looped_grad(d_outputs))

            if ops is None:
                return tensorflow_grad()
            return _cond(few_rows,
                         lambda: tuple(ops.moe_grouped_feed_forward_grad(
                             inputs, group_sizes, kernel_in, bias_in, kernel_out, hidden,
                             d_outputs)),
                         tensorflow_grad)

        return outputs, grad

    return forward(inputs, kernel_in, bias_in, kernel_out, bias_out)


def _batched_feed_forward(inputs, kernel_in, bias_in, kernel_out, bias_out):
    """Every expert on its own buffer: `[experts, capacity, d_in]` -> `[..., d_out]`."""
    hidden = tf.nn.relu(tf.einsum("ecd,edh->ech", inputs, kernel_in) + bias_in[:, None, :])
    return tf.einsum("ech,eho->eco", hidden, kernel_out) + bias_out[:, None, :]


@keras.saving.register_keras_serializable(package="moe_tf")
class FeedForwardExperts(keras.layers.Layer):
    """`num_experts` independent ReLU feed-forward networks with stacked weights.

    Weights: `kernel_in` `[experts, input_dim, hidden_size]`, `bias_in`
    `[experts, hidden_size]`, `kernel_out` `[experts, hidden_size, output_size]`,
    `bias_out` `[experts, output_size]`.

    With `recompute_activations=True` the hidden activations are not kept for the
    backward pass but recomputed there (Appendix D of the paper): one more
    `input_dim x hidden_size` matmul per row, and no `[rows, hidden_size]` tensor held
    from the forward to the backward pass.

    With `compiled_kernels=True` (the default), grouped training calls run the experts
    with the compiled CPU kernels of `moe_tf.kernels` when they are built, no GPU is
    visible, the weights and inputs are float32 with widths that are multiples of 16,
    and the experts average at most 2048 rows. Inference calls always use TensorFlow
    ops, so that exported SavedModels load without this package's op library.
    """

    def __init__(self, *, num_experts: int, hidden_size: int, output_size: int,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 recompute_activations: bool = False, compiled_kernels: bool = True,
                 **kwargs):
        super().__init__(**kwargs)
        self.num_experts = num_experts
        self.compiled_kernels = compiled_kernels
        self.hidden_size = hidden_size
        self.output_size = output_size
        self.recompute_activations = recompute_activations
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

    def call(self, inputs, *, group_sizes: Optional[tf.Tensor] = None, training=None):
        """Runs the experts.

        Args:
            inputs: `[rows, input_dim]` sorted by expert when `group_sizes` is given
                (grouped), else `[experts, capacity, input_dim]` (batched).
            group_sizes: int32 `[experts]`, the rows of each expert in grouped mode; rows
                after the last expert's are padding (zero outputs and gradients).
            training: the compiled kernels run only in training calls (`True`).

        Returns:
            `[rows, output_size]` or `[experts, capacity, output_size]`.
        """
        weights = [tf.convert_to_tensor(w) for w in
                   (self.kernel_in, self.bias_in, self.kernel_out, self.bias_out)]
        if group_sizes is not None:
            return _grouped_feed_forward(
                inputs, group_sizes, *weights,
                recompute_activations=self.recompute_activations,
                compiled_kernels=self.compiled_kernels and training is True)
        if self.recompute_activations:
            return tf.recompute_grad(_batched_feed_forward)(inputs, *weights)
        return _batched_feed_forward(inputs, *weights)

    def get_config(self):
        config = super().get_config()
        config.update(num_experts=self.num_experts, hidden_size=self.hidden_size,
                      output_size=self.output_size,
                      kernel_initializer=keras.initializers.serialize(
                          self.kernel_initializer),
                      bias_initializer=keras.initializers.serialize(self.bias_initializer),
                      recompute_activations=self.recompute_activations,
                      compiled_kernels=self.compiled_kernels)
        return config
