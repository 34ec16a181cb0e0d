"""The experts: `num_experts` feed-forward networks d_in -> hidden -> d_out.

The paper's expert is a ReLU FFN; the gated experts of later MoE language models
(Mixtral's and Qwen's SwiGLU, GPT-OSS's clamped variant) are options of the same layer.
Parameters are stacked with a leading `num_experts` dimension, so one variable holds every
expert's kernel (the layout DTensor shards on the expert axis). Two ways to run them:
- in blocks: tokens sorted by expert, `[rows, d_in]`, with the number of rows of each
  expert (`expert_row_counts`); each expert multiplies only its own block of rows (the
  dropless sparse path);
- batched: a fixed-capacity buffer `[experts, capacity, d_in]`, one batched einsum.
"""

import functools
import math
from typing import NamedTuple, Optional, Union

import keras
import tensorflow as tf

from moe_tf import kernels


# How FeedForwardExperts stores its kernels; the first is the trainable one.
KERNEL_STORAGES = ("float32", "bfloat16", "int8")
# Gated experts: kernel_in holds [gate | up] (2 x hidden columns), and the hidden
# activations are "glu": activation(gate) * up (SwiGLU with silu, GeGLU with gelu);
# "gpt_oss": GPT-OSS's clamped variant (see `expert_hidden`).
GATED_VARIANTS = ("glu", "gpt_oss")
# See `FeedForwardExperts.per_assignment_limit`.
PER_ASSIGNMENT_WEIGHTS_PER_EXPERT = 16384
# GPT-OSS's constants: gate and up clamped at 7, gate * sigmoid(1.702 gate).
_GPT_OSS_LIMIT = 7.0
_GPT_OSS_ALPHA = 1.702


def expert_hidden(pre_activations: tf.Tensor, activation, gated: Optional[str]) -> tf.Tensor:
    """The experts' hidden activations from x kernel_in + bias_in, `[..., hidden]`.

    `gated` None: activation(pre). "glu": pre = [gate | up] (`[..., 2 hidden]`),
    activation(gate) * up. "gpt_oss": the same halves, min(gate, 7) * sigmoid(1.702
    min(gate, 7)) * (clip(up, -7, 7) + 1) (the activation is unused).
    """
    if gated is None:
        return activation(pre_activations)
    gate, up = tf.split(pre_activations, 2, axis=-1)
    if gated == "glu":
        return activation(gate) * up
    gate = tf.minimum(gate, _GPT_OSS_LIMIT)
    up = tf.clip_by_value(up, -_GPT_OSS_LIMIT, _GPT_OSS_LIMIT)
    return gate * tf.sigmoid(_GPT_OSS_ALPHA * gate) * (up + 1.0)


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
# batches the experts over padded blocks (see `_pad_to_batch`).
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


def _pad_to_batch(expert_row_counts: tf.Tensor, num_rows) -> tf.Tensor:
    """Whether the backward pass over `num_rows` sorted rows should pad each expert's block
    of rows and batch the experts.

    True when every block is smaller than `_SMALL_BLOCK_ROWS` (per-expert matmuls are
    then dominated by per-call overhead and the copies of kernel gradients into place)
    and padding at most doubles the rows (it costs memory and FLOPs in proportion, and
    a skewed routing, one expert with most rows, must not blow it up).
    Measured crossover on the benchmark shapes: about 128 rows per expert.
    Never without rows (an empty batch): unfilled slots gather row 0.
    """
    largest = tf.reduce_max(expert_row_counts)
    return tf.logical_and(
        tf.logical_and(num_rows > 0, largest < _SMALL_BLOCK_ROWS),
        largest * tf.size(expert_row_counts) <= 2 * tf.reduce_sum(expert_row_counts))


# What gathering one expert's two kernels for the overflow pass costs, in padded rows of
# the batched backward pass: a copy of 2 d h floats (read and written) against the
# 4 x 2 d h FLOPs of a row, so 2 x (FLOP rate) / (copy bandwidth); about 60 here.
_OVERFLOW_EXPERT_ROWS = 64


def _split_capacity(expert_row_counts: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """How the padded backward pass splits the blocks: (capacity, overflow capacity).

    The first pass pads every expert's block to `capacity` rows, the second pads the rest
    of each larger block to `overflow capacity` = largest - capacity rows. The capacity
    (at least 1) minimises experts x capacity + overflowing experts x
    (`_OVERFLOW_EXPERT_ROWS` + overflow capacity): at E = 512 and 32 rows per expert the
    largest block has about 53 rows; a capacity of about 43 leaves about a dozen experts
    for the second pass.
    """
    largest = tf.reduce_max(expert_row_counts)
    capacity = tf.range(1, tf.maximum(largest, 1) + 1)                 # candidates
    overflowing = tf.reduce_sum(
        tf.cast(expert_row_counts[None, :] > capacity[:, None], tf.int32), axis=1)
    cost = (tf.size(expert_row_counts) * capacity
            + overflowing * (_OVERFLOW_EXPERT_ROWS + largest - capacity))
    best = tf.gather(capacity, tf.argmin(cost, output_type=tf.int32))
    return best, tf.maximum(largest - best, 0)


# Up to this many rows per expert on average the compiled kernels beat the TensorFlow
# path (experts' FFN forward and backward, float32, d = 512, h = 1024, 16384 rows, 2 cores;
# ad hoc, ranges over runs): 32 rows 372 against 493-514 ms, 256 rows 263-272 against
# 288-306, 1024 rows 259-263 against 275-310, 2048 rows 251-263 against 269-290; at 4096
# rows (4 experts for 2 threads) they are even, 273-278 against 274-276.
_COMPILED_KERNEL_ROWS = 2048


def _compiled_kernels_for(inputs, kernel_in, kernel_out, *, required: bool):
    """The compiled kernels' ops for these operands (`kernels.op_library_for`, and every
    width a multiple of 16), or None; with `required`, a ValueError instead of None."""
    widths = (inputs.shape[-1], kernel_in.shape[-1], kernel_out.shape[-1])
    if any(w is None or w % 16 for w in widths):
        if required:
            raise ValueError(f"compiled_kernels=True, but the compiled kernels cannot run "
                             f"the experts: their widths (input, hidden, output) = "
                             f"{widths} must be multiples of 16.")
        return None
    return kernels.op_library_for(inputs, kernel_in, kernel_out, required=required)


def _cond(pred, true_fn, false_fn):
    """tf.cond, or just the branch when `pred` is a Python bool: a loop inside a cond
    branch misses Grappler's loop optimisations."""
    if isinstance(pred, bool):
        return true_fn() if pred else false_fn()
    return tf.cond(pred, true_fn, false_fn)


class _ExpertBlocks(NamedTuple):
    """The operands of the experts' FFNs on contiguous blocks of rows sorted by expert.

    Attributes:
        inputs: `[rows, d_in]`; expert e's rows are `offsets[e] .. offsets[e + 1] - 1`,
            and the last `padding_rows` rows are padding.
        expert_row_counts: int32 `[experts]`, the rows of each expert.
        offsets: int32 `[experts + 1]`, the cumulative sum of `expert_row_counts`.
        padding_rows: int32 scalar, the rows after the last expert's.
        num_experts: int32 scalar.
        kernel_in `[experts, d_in, hidden]`, bias_in `[experts, hidden]`,
        kernel_out `[experts, hidden, d_out]`, bias_out `[experts, d_out]`.
    """

    inputs: tf.Tensor
    expert_row_counts: tf.Tensor
    offsets: tf.Tensor
    padding_rows: tf.Tensor
    num_experts: tf.Tensor
    kernel_in: tf.Tensor
    bias_in: tf.Tensor
    kernel_out: tf.Tensor
    bias_out: tf.Tensor

    @property
    def weights(self) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
        return self.kernel_in, self.bias_in, self.kernel_out, self.bias_out

    def hidden_of(self, x: tf.Tensor, e) -> tf.Tensor:
        """Expert e's activations for its rows `x`: relu(x kernel_in[e] + bias_in[e])."""
        return tf.nn.relu(tf.matmul(x, self.kernel_in[e]) + self.bias_in[e])


def _for_each_expert(blocks: _ExpertBlocks, body, row_outputs, expert_outputs):
    """Runs `body(e, begin, end)` for every expert e, the rows [begin, end) its own.

    `body` returns a block `[end - begin, width]` for each (dtype, width) of
    `row_outputs` and expert e's slice for each (dtype, shape) of `expert_outputs`.
    Returns the blocks concatenated, `[rows, width]` (zeros for the padding rows), and
    the slices stacked, `[experts, ...]`.

    One `tf.while_loop` iteration per expert keeps the graph the same size for 8 or 4096
    experts. Row blocks go through TensorArrays: a write keeps a reference and the final
    concat is one parallel copy (writing rows in place is slower: InplaceUpdate copies
    row by row). The per-expert slices (the kernel gradients) are written in place,
    so that each stacked gradient (1 GiB per kernel at 512 experts of the paper's
    size) exists once: TensorArray.stack would hold it twice, and a scatter would copy
    the whole buffer on every write.
    """
    num_experts, offsets = blocks.num_experts, blocks.offsets
    arrays = [tf.TensorArray(dtype, size=num_experts + 1, infer_shape=False,
                             element_shape=[None, width])
              for dtype, width in row_outputs]
    buffers = [tf.raw_ops.Empty(shape=shape, dtype=dtype)
               for dtype, shape in expert_outputs]

    def step(e, arrays, buffers):
        row_blocks, slices = body(e, offsets[e], offsets[e + 1])
        return (e + 1, [a.write(e, block) for a, block in zip(arrays, row_blocks)],
                [_write_in_place(b, [e], s[None]) for b, s in zip(buffers, slices)])

    _, arrays, buffers = tf.while_loop(lambda e, *_: e < num_experts, step,
                                       (0, arrays, buffers))
    arrays = [a.write(num_experts, tf.zeros([blocks.padding_rows, width], dtype))
              for a, (dtype, width) in zip(arrays, row_outputs)]
    return [a.concat() for a in arrays], buffers


def _looped_forward(blocks: _ExpertBlocks, keep_hidden: bool):
    """The forward pass as a loop over the experts (`_for_each_expert`).

    Returns `[rows, d_out]` and the activations for the backward pass, `[rows, hidden]`
    when `keep_hidden`, else without rows.
    """
    dtype, hidden_size = blocks.inputs.dtype, blocks.kernel_in.shape[-1]

    def expert(e, begin, end):
        act = blocks.hidden_of(blocks.inputs[begin:end], e)
        out = tf.matmul(act, blocks.kernel_out[e]) + blocks.bias_out[e]
        return ([out, act] if keep_hidden else [out]), []

    row_outputs = [(dtype, blocks.kernel_out.shape[-1])]
    if keep_hidden:
        row_outputs.append((dtype, hidden_size))
    (outputs, *kept), _ = _for_each_expert(blocks, expert, row_outputs, [])
    return outputs, (kept[0] if kept else tf.zeros([0, hidden_size], dtype))


def _compiled_forward(blocks: _ExpertBlocks, ops, keep_hidden: bool):
    """The forward pass as the compiled kernel: (`[rows, d_out]`, activations)."""
    return tuple(ops.moe_grouped_feed_forward(blocks.inputs, blocks.expert_row_counts,
                                              *blocks.weights, keep_hidden=keep_hidden))


def _looped_grad(blocks: _ExpertBlocks, d_outputs, hidden=None):
    """The backward pass as a loop over the experts (`_for_each_expert`), each on its own
    rows; the kernel gradients are written into place expert by expert.

    `hidden`: the forward pass's activations `[rows, hidden]`, or None to recompute them.
    Returns the gradients of the rows and of the four weights.
    """
    def expert_grad(e, begin, end):
        x = blocks.inputs[begin:end]
        dy = d_outputs[begin:end]
        act = hidden[begin:end] if hidden is not None else blocks.hidden_of(x, e)
        d_pre = tf.raw_ops.ReluGrad(
            gradients=_times_transposed(dy, blocks.kernel_out[e]), features=act)
        return ([_times_transposed(d_pre, blocks.kernel_in[e])],
                [tf.matmul(x, d_pre, transpose_a=True),
                 tf.raw_ops.BiasAddGrad(out_backprop=d_pre),
                 tf.matmul(act, dy, transpose_a=True),
                 tf.raw_ops.BiasAddGrad(out_backprop=dy)])

    (d_inputs,), d_weights = _for_each_expert(
        blocks, expert_grad, [(blocks.inputs.dtype, blocks.inputs.shape[-1])],
        [(w.dtype, tf.shape(w)) for w in blocks.weights])
    return (d_inputs, *d_weights)


def _slots(first_rows, counts, width):
    """`[experts, width]` slots of padded blocks: the row of each slot (0 where unfilled)
    and whether it is filled, for blocks starting at `first_rows` with `counts` rows."""
    slot = tf.range(width)[None, :]
    filled = slot < counts[:, None]
    return tf.where(filled, first_rows[:, None] + slot, 0), filled


def _batched_grad(blocks: _ExpertBlocks, d_outputs, hidden, row_of_slot, filled,
                  k_in, b_in, k_out):
    """The backward pass of the experts whose rows `row_of_slot` (`[experts, slots]`, of
    the sorted rows; `filled` marks the real ones) gathers, with those experts' weights
    `k_in`, `b_in`, `k_out`: batched matmuls.

    `hidden`: the forward pass's activations `[rows, hidden]`, or None to recompute them.
    Returns d rows `[experts, slots, d_in]` and the experts' weight gradients. Unfilled
    slots repeat some row and get zero gradients (their `dy` is masked), so they add
    nothing.
    """
    x = tf.gather(blocks.inputs, row_of_slot)                   # [experts, slots, d_in]
    dy = tf.gather(d_outputs, row_of_slot) * tf.cast(filled, x.dtype)[..., None]
    if hidden is not None:
        act = tf.gather(hidden, row_of_slot)
    else:
        act = tf.nn.relu(tf.matmul(x, k_in) + b_in[:, None, :])
    d_pre = tf.raw_ops.ReluGrad(
        gradients=tf.matmul(dy, k_out, transpose_b=True), features=act)
    return (tf.matmul(d_pre, k_in, transpose_b=True),
            tf.matmul(x, d_pre, transpose_a=True), tf.reduce_sum(d_pre, axis=1),
            tf.matmul(act, dy, transpose_a=True), tf.reduce_sum(dy, axis=1))


def _padded_grad(blocks: _ExpertBlocks, d_outputs, hidden=None):
    """The backward pass as batched matmuls over padded blocks, in two passes.

    With few rows per expert, one batched matmul beats a loop of small ones, and the
    kernel gradients come out stacked, with no per-expert copy into place. The first
    pass takes the first `capacity` rows of every expert, the second the rest of the few
    larger blocks, with those experts' weights gathered; its weight gradients are added
    in place (`_split_capacity` chooses the split).

    `hidden`: the forward pass's activations `[rows, hidden]`, or None to recompute them.
    Returns the gradients of the rows and of the four weights.
    """
    counts, offsets = blocks.expert_row_counts, blocks.offsets
    capacity, overflow_capacity = _split_capacity(counts)
    row_of_slot, filled = _slots(offsets[:-1], counts, capacity)
    d_x, *d_weights = _batched_grad(blocks, d_outputs, hidden, row_of_slot, filled,
                                    blocks.kernel_in, blocks.bias_in, blocks.kernel_out)

    overflowing = tf.cast(tf.where(counts > capacity)[:, 0], tf.int32)
    row_of_slot, filled_over = _slots(tf.gather(offsets, overflowing) + capacity,
                                      tf.gather(counts, overflowing) - capacity,
                                      overflow_capacity)
    d_x_over, *d_weights_over = _batched_grad(
        blocks, d_outputs, hidden, row_of_slot, filled_over,
        *(tf.gather(w, overflowing) for w in blocks.weights[:3]))
    # In place: each gradient is a fresh matmul or sum output read by nothing else.
    d_weights = [tf.raw_ops.InplaceAdd(x=d, i=overflowing, v=d_over)
                 for d, d_over in zip(d_weights, d_weights_over)]

    # Back to the sorted rows: every row from its first-pass slot (clipped for the
    # overflow rows), then the overflow rows written over, in place.
    expert_of_row = tf.repeat(tf.range(blocks.num_experts), counts)
    position = tf.range(offsets[-1]) - tf.gather(offsets, expert_of_row)
    d_rows = tf.gather(tf.reshape(d_x, [-1, blocks.inputs.shape[-1]]),
                       expert_of_row * capacity + tf.minimum(position, capacity - 1))
    d_rows = _write_in_place(d_rows, tf.boolean_mask(row_of_slot, filled_over),
                             tf.boolean_mask(d_x_over, filled_over))
    return (tf.pad(d_rows, [[0, blocks.padding_rows], [0, 0]]), *d_weights)


def _tensorflow_grad(blocks: _ExpertBlocks, d_outputs, hidden=None):
    """The backward pass in TensorFlow ops: padded and batched when the blocks are small
    (`_pad_to_batch`), else the loop over the experts. `hidden` as for `_looped_grad`."""
    return tf.cond(_pad_to_batch(blocks.expert_row_counts, tf.shape(blocks.inputs)[0]),
                   functools.partial(_padded_grad, blocks, d_outputs, hidden),
                   functools.partial(_looped_grad, blocks, d_outputs, hidden))


def _compiled_grad(blocks: _ExpertBlocks, ops, hidden, d_outputs):
    """The backward pass as the compiled kernel; `hidden` is the compiled forward pass's
    (without rows it recomputes the activations)."""
    return tuple(ops.moe_grouped_feed_forward_grad(
        blocks.inputs, blocks.expert_row_counts, blocks.kernel_in, blocks.bias_in,
        blocks.kernel_out, hidden, d_outputs))


def _use_compiled_kernels(blocks: _ExpertBlocks, ops, compiled_kernels):
    """Whether the compiled kernels run both passes: when they suit the operands (`ops`
    is not None) and, unless they are required (`compiled_kernels=True`) or XLA compiles
    the call (its custom calls are the only blocks XLA runs), the experts average at most
    `_COMPILED_KERNEL_ROWS` rows.

    A Python bool when that is known while tracing (the shapes are static), else a
    boolean tensor: `_cond` then decides at run time.
    """
    if ops is None:
        return False
    if compiled_kernels is True or kernels.compiling_with_xla():
        return True
    inputs, kernel_in = blocks.inputs, blocks.kernel_in
    rows = inputs.shape[0] if inputs.shape[0] is not None else tf.shape(inputs)[0]
    experts = kernel_in.shape[0] if kernel_in.shape[0] is not None else blocks.num_experts
    return rows <= _COMPILED_KERNEL_ROWS * experts


def _grouped_feed_forward(inputs, expert_row_counts, kernel_in, bias_in, kernel_out,
                          bias_out, *, recompute_activations: bool = False,
                          compiled_kernels: Union[str, bool] = False):
    """Each expert's FFN on its own contiguous block of rows.

    Args:
        inputs: `[rows, d_in]`, sorted by expert: the first `expert_row_counts[0]` rows
            are expert 0's, and so on; rows after the last expert's are padding.
        expert_row_counts: int32 `[experts]`, rows per expert (sums to at most `rows`).
        kernel_in `[experts, d_in, hidden]`, bias_in `[experts, hidden]`,
        kernel_out `[experts, hidden, d_out]`, bias_out `[experts, d_out]`.
        recompute_activations: keep no `[rows, hidden]` activations for the backward
            pass, which recomputes them (one more matmul per expert).
        compiled_kernels: "auto": run the experts with the compiled kernels of
            `moe_tf.kernels` when they are built and suit the operands, and the experts
            average at most `_COMPILED_KERNEL_ROWS` rows (with more, oneDNN's large
            matmuls are faster); True: always, a ValueError where they cannot run;
            False: never.

    Returns:
        `[rows, d_out]`, zeros for the padding rows (which get zero gradients too).

    Without the compiled kernels both passes loop over the experts
    (`_looped_forward`, `_looped_grad`). The gradient is written by hand: autodiff
    through a loop that slices the stacked kernels would add a dense `[experts, ...]`
    gradient on every iteration. The backward pass batches the experts instead when
    their blocks are small enough to pad to the largest (`_padded_grad`).
    """
    num_experts = tf.shape(kernel_in)[0]
    ops = (None if compiled_kernels is False else _compiled_kernels_for(
        inputs, kernel_in, kernel_out, required=compiled_kernels is True))
    offsets = tf.concat([[0], tf.cumsum(expert_row_counts)], axis=0)
    padding_rows = tf.shape(inputs)[0] - offsets[-1]
    keep_hidden = not recompute_activations

    @tf.custom_gradient
    def forward(inputs, kernel_in, bias_in, kernel_out, bias_out):
        blocks = _ExpertBlocks(inputs, expert_row_counts, offsets, padding_rows,
                               num_experts, kernel_in, bias_in, kernel_out, bias_out)
        use_kernels = _use_compiled_kernels(blocks, ops, compiled_kernels)
        outputs, hidden = _cond(
            use_kernels, functools.partial(_compiled_forward, blocks, ops, keep_hidden),
            functools.partial(_looped_forward, blocks, keep_hidden))

        def grad(d_outputs):
            return _cond(use_kernels,
                         functools.partial(_compiled_grad, blocks, ops, hidden, d_outputs),
                         functools.partial(_tensorflow_grad, blocks, d_outputs,
                                           hidden if keep_hidden else None))

        return outputs, grad

    return forward(inputs, kernel_in, bias_in, kernel_out, bias_out)


def _batched_feed_forward(inputs, kernel_in, bias_in, kernel_out, bias_out, *,
                          hidden_fn=tf.nn.relu):
    """Every expert on its own buffer: `[experts, capacity, d_in]` -> `[..., d_out]`;
    `hidden_fn` maps x kernel_in + bias_in to the hidden activations.

    Batched matmuls rather than einsums: TensorFlow's CPU Einsum transposes operands
    that BatchMatMulV2 reads in place (E = 512 buffers of 32 rows, d 512, h 1024: 14.8
    against 10.9 s per forward and backward step here).
    """
    hidden = hidden_fn(tf.matmul(inputs, kernel_in) + bias_in[:, None, :])
    return tf.matmul(hidden, kernel_out) + bias_out[:, None, :]


class _RowBlocks(NamedTuple):
    """Rows sorted by expert in contiguous blocks (the layout `_for_each_expert` reads;
    see `_ExpertBlocks` for the fields), and each row's expert (`num_experts` for the
    padding rows)."""

    offsets: tf.Tensor
    padding_rows: tf.Tensor
    num_experts: tf.Tensor
    expert_of_row: tf.Tensor

    @classmethod
    def of(cls, expert_row_counts, num_rows) -> "_RowBlocks":
        num_experts = tf.size(expert_row_counts)
        offsets = tf.concat([[0], tf.cumsum(expert_row_counts)], axis=0)
        padding_rows = num_rows - offsets[-1]
        expert_of_row = tf.pad(tf.repeat(tf.range(num_experts), expert_row_counts),
                               [[0, padding_rows]], constant_values=num_experts)
        return cls(offsets, padding_rows, num_experts, expert_of_row)


def _grouped_matmul(rows, blocks: _RowBlocks, kernel):
    """Each expert's block of rows times its own kernel: `[rows, a]` x `[experts, a, b]`
    -> `[rows, b]` (zeros for the padding rows after the last block).

    The building block of the experts other than the paper's ReLU FFN (which has its own
    fused passes): both passes loop over the experts, and the kernel gradient is written
    into place expert by expert, never as a dense `[experts, a, b]` sum per expert.
    """
    @tf.custom_gradient
    def forward(rows, kernel):
        def expert(e, begin, end):
            return [tf.matmul(rows[begin:end], kernel[e])], []

        (outputs,), _ = _for_each_expert(blocks, expert, [(rows.dtype, kernel.shape[-1])],
                                         [])

        def grad(d_outputs):
            def expert_grad(e, begin, end):
                dy = d_outputs[begin:end]
                return ([_times_transposed(dy, kernel[e])],
                        [tf.matmul(rows[begin:end], dy, transpose_a=True)])

            (d_rows,), (d_kernel,) = _for_each_expert(
                blocks, expert_grad, [(rows.dtype, rows.shape[-1])],
                [(kernel.dtype, tf.shape(kernel))])
            return d_rows, d_kernel

        return outputs, grad

    return forward(rows, kernel)


def _dequantised(stored: tf.Tensor, scale: Optional[tf.Tensor], dtype) -> tf.Tensor:
    """A kernel stored as float32 or bfloat16 (`scale` None), or as int8 with its float32
    `scale` (`round(w / scale)`), as a `dtype` tensor."""
    if scale is None:
        return tf.cast(stored, dtype)
    return tf.cast(tf.cast(stored, tf.float32) * scale, dtype)


def _dequantised_grouped_matmul(rows, blocks: _RowBlocks, kernel, scale):
    """`_grouped_matmul`'s product for inference with kernels stored in bfloat16 or int8
    (`scale` `[experts, 1, b]`, or None): each expert's kernel is dequantised inside its
    own loop iteration, and only when it has rows, so a call costs the dequantisation of
    the experts it uses (a generation step: k of them) rather than of all. No gradient."""
    width = kernel.shape[-1]

    def expert(e, begin, end):
        def product():
            weight = _dequantised(kernel[e], None if scale is None else scale[e],
                                  rows.dtype)
            return tf.matmul(rows[begin:end], weight)

        return [tf.cond(end > begin, product, lambda: tf.zeros([0, width], rows.dtype))], []

    (outputs,), _ = _for_each_expert(blocks, expert, [(rows.dtype, width)], [])
    return outputs


def _row_biases(bias, blocks: _RowBlocks):
    """Each sorted row's expert's bias, `[rows, width]` (zeros for the padding rows)."""
    return tf.gather(tf.pad(bias, [[0, 1], [0, 0]]), blocks.expert_of_row)


def _grouped_general_feed_forward(inputs, kernel_in, bias_in, kernel_out, bias_out, *,
                                  expert_row_counts, hidden_fn, matmul=_grouped_matmul):
    """The sparse path of any expert (`_grouped_feed_forward`'s contract, less its
    options): two grouped matmuls (`matmul(rows, blocks, kernel)`), the hidden
    activations by `hidden_fn` in between."""
    blocks = _RowBlocks.of(expert_row_counts, tf.shape(inputs)[0])
    pre = matmul(inputs, blocks, kernel_in) + _row_biases(bias_in, blocks)
    outputs = matmul(hidden_fn(pre), blocks, kernel_out)
    return outputs + _row_biases(bias_out, blocks)


@keras.saving.register_keras_serializable(package="moe_tf")
class FeedForwardExperts(keras.layers.Layer):
    """`num_experts` independent feed-forward networks with stacked weights.

    Weights: `kernel_in` `[experts, input_dim, hidden_size]`, `bias_in`
    `[experts, hidden_size]`, `kernel_out` `[experts, hidden_size, output_size]`,
    `bias_out` `[experts, output_size]`; no biases with `use_bias=False`.

    Each expert computes activation(x kernel_in + bias_in) kernel_out + bias_out, with
    `activation` a Keras activation ("relu", the paper's, by default). With `gated`
    ("glu" or "gpt_oss", see `expert_hidden`) the expert is gated as in later MoE
    language models: `kernel_in` and `bias_in` then have 2 x hidden_size columns, the gate
    projection's then the up projection's, and the hidden activations are
    activation(gate) * up (SwiGLU with "silu", GeGLU with "gelu") or GPT-OSS's variant.

    With `recompute_activations=True` the hidden activations are not kept for the
    backward pass but recomputed there (Appendix D of the paper): one more
    `input_dim x hidden_size` matmul per row, and no `[rows, hidden_size]` tensor held
    from the forward to the backward pass.

    `compiled_kernels` follows Keras's `LSTM(use_cudnn=...)`: with "auto" (the default),
    training calls on sorted rows run the experts with the compiled CPU kernels of
    `moe_tf.kernels` when they are built, no GPU is visible, the experts are the paper's
    (ReLU, not gated), the weights and inputs are float32 with widths that are multiples
    of 16, and the experts average at most 2048 rows; True runs them in every such call
    and raises a ValueError naming the reason where they cannot run; False never runs
    them. Other experts run on sorted rows as grouped matmuls in TensorFlow ops. Inference calls always use TensorFlow
    ops, so that exported SavedModels load without this package's op library.

    `kernel_storage` is how the two kernels are stored: "float32" (trainable), or, for
    smaller exports, "bfloat16" or "int8" (weight-only: `round(w / scale)` with one
    float32 scale per expert and output channel, `kernel_in_scale` `[experts, 1, hidden]`
    and `kernel_out_scale` `[experts, 1, output]`), dequantised in the graph at every
    call: on sorted rows only the kernels of the experts with rows, each in its own loop
    iteration; in `per_assignment` each row's gathered ones; on buffers all. Such kernels
    are not trainable. `quantize_kernels` converts a built layer.
    """

    def __init__(self, *, num_experts: int, hidden_size: int, output_size: int,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 recompute_activations: bool = False,
                 compiled_kernels: Union[str, bool] = "auto",
                 kernel_storage: str = "float32", activation="relu",
                 gated: Optional[str] = None, use_bias: bool = True, **kwargs):
        super().__init__(**kwargs)
        if kernel_storage not in KERNEL_STORAGES:
            raise ValueError(f"FeedForwardExperts: `kernel_storage` must be one of "
                             f"{KERNEL_STORAGES}; got {kernel_storage!r}.")
        if gated is not None and gated not in GATED_VARIANTS:
            raise ValueError(f"FeedForwardExperts: `gated` must be None or one of "
                             f"{GATED_VARIANTS}; got {gated!r}.")
        self.activation = keras.activations.get(activation)
        self.gated = gated
        self.use_bias = use_bias
        if compiled_kernels is True and not self._is_paper_expert:
            raise ValueError("FeedForwardExperts: compiled_kernels=True, but the compiled "
                             "kernels run only the paper's ReLU experts (not gated); use "
                             "'auto' or False.")
        self.kernel_storage = kernel_storage
        self.num_experts = num_experts
        self.compiled_kernels = compiled_kernels
        self.hidden_size = hidden_size
        self.output_size = output_size
        self.recompute_activations = recompute_activations
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    @property
    def _is_paper_expert(self) -> bool:
        """ReLU, not gated: the experts the fused passes and compiled kernels run."""
        return self.gated is None and self.activation is keras.activations.relu

    def runs_compiled_kernels(self, sorted_rows: tf.Tensor,
                              compiled_kernels: Union[str, bool]) -> bool:
        """Whether a call on `sorted_rows` (`[rows, input_dim]` in blocks) that XLA
        compiles runs the compiled kernels, with `compiled_kernels` as the layer passes it
        ("auto" or True in training calls, else False): the paper's experts, kept in
        float32 and computed in float32, with widths the kernels take, kernels built, no
        GPU."""
        return (compiled_kernels is not False and self._is_paper_expert
                and self.kernel_storage == "float32"
                and _compiled_kernels_for(sorted_rows, self.kernel_in, self.kernel_out,
                                          required=False) is not None)

    def build(self, input_shape):
        input_dim = input_shape[-1]
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: input_dim})
        kernel_init = _per_expert_initializer(self.kernel_initializer, self.num_experts)
        in_width = self.hidden_size * (2 if self.gated else 1)
        # This order (kernel_in, bias_in, kernel_out, bias_out) is the weights' order in
        # `.keras` files.
        self._add_kernel("kernel_in", (self.num_experts, input_dim, in_width), kernel_init)
        if self.use_bias:
            self.bias_in = self.add_weight(name="bias_in", shape=(self.num_experts, in_width),
                                           initializer=self.bias_initializer)
        self._add_kernel("kernel_out",
                         (self.num_experts, self.hidden_size, self.output_size),
                         kernel_init)
        if self.use_bias:
            self.bias_out = self.add_weight(name="bias_out",
                                            shape=(self.num_experts, self.output_size),
                                            initializer=self.bias_initializer)

    def _add_kernel(self, name: str, shape, initializer) -> None:
        """Adds kernel `name` (and its scale, for int8) in `kernel_storage`."""
        if self.kernel_storage == "float32":
            setattr(self, name, self.add_weight(name=name, shape=shape,
                                                initializer=initializer))
            return
        setattr(self, name, self.add_weight(
            name=name, shape=shape, initializer="zeros", dtype=self.kernel_storage,
            trainable=False, autocast=False))
        if self.kernel_storage == "int8":
            setattr(self, f"{name}_scale", self.add_weight(
                name=f"{name}_scale", shape=(shape[0], 1, shape[2]), initializer="ones",
                trainable=False, autocast=False))

    def quantize_kernels(self, storage: str) -> None:
        """Stores the (float32, built) kernels in `storage`, "bfloat16" or "int8" (see the
        class docstring), for inference and export."""
        if storage not in KERNEL_STORAGES[1:]:
            raise ValueError(f"FeedForwardExperts.quantize_kernels: `storage` must be one "
                             f"of {KERNEL_STORAGES[1:]}; got {storage!r}.")
        if self.kernel_storage != "float32" or not self.built:
            raise ValueError(f"FeedForwardExperts {self.name!r}: only built float32 "
                             f"kernels can be quantized (kernels: {self.kernel_storage}).")
        values = {name: tf.convert_to_tensor(getattr(self, name))
                  for name in ("kernel_in", "kernel_out")}
        self.kernel_storage = storage
        self._tracker.unlock()  # as Keras's own `quantize` does: new variables, built
        for name, value in values.items():
            delattr(self, name)  # Keras untracks the float32 variable
            self._add_kernel(name, value.shape, None)
            if storage == "int8":
                quantized, scale = quantize_per_output_channel(value)
                getattr(self, name).assign(quantized)
                getattr(self, f"{name}_scale").assign(scale)
            else:
                getattr(self, name).assign(tf.cast(value, storage))
        self._tracker.lock()

    def _stored_kernel(self, name: str):
        """Kernel `name` as stored, and its int8 scale (None for other storages)."""
        scale = (tf.convert_to_tensor(getattr(self, f"{name}_scale"))
                 if self.kernel_storage == "int8" else None)
        return tf.convert_to_tensor(getattr(self, name)), scale

    def _kernel(self, name: str, expert_index: Optional[tf.Tensor] = None) -> tf.Tensor:
        """Kernel `name` as a tensor of the compute dtype, dequantised if stored so;
        with `expert_index` (int32 `[rows]`) only those experts' kernels, `[rows, ...]`
        (gathered before dequantising)."""
        kernel, scale = self._stored_kernel(name)
        if expert_index is not None:
            kernel = tf.gather(kernel, expert_index)
            scale = None if scale is None else tf.gather(scale, expert_index)
        return _dequantised(kernel, scale, self.compute_dtype)

    def call(self, inputs, *, expert_row_counts: Optional[tf.Tensor] = None,
             training=None):
        """Runs the experts.

        Args:
            inputs: `[rows, input_dim]` sorted by expert when `expert_row_counts` is
                given (in blocks), else `[experts, capacity, input_dim]` (batched).
            expert_row_counts: int32 `[experts]`, the rows of each expert's block; rows
                after the last expert's are padding (zero outputs and gradients).
            training: the compiled kernels run only in training calls (`True`).

        Returns:
            `[rows, output_size]` or `[experts, capacity, output_size]`.
        """
        hidden_fn = functools.partial(expert_hidden, activation=self.activation,
                                      gated=self.gated)
        if expert_row_counts is not None and self.kernel_storage != "float32":
            return self._quantized_sorted_rows(inputs, expert_row_counts, hidden_fn)
        kernel_in, kernel_out = self._kernel("kernel_in"), self._kernel("kernel_out")
        weights = [kernel_in, self._bias("bias_in", kernel_in), kernel_out,
                   self._bias("bias_out", kernel_out)]
        if expert_row_counts is not None and self._is_paper_expert:
            return _grouped_feed_forward(
                inputs, expert_row_counts, *weights,
                recompute_activations=self.recompute_activations,
                compiled_kernels=self.compiled_kernels if training is True else False)
        if expert_row_counts is not None:
            forward = functools.partial(_grouped_general_feed_forward,
                                        expert_row_counts=expert_row_counts,
                                        hidden_fn=hidden_fn)
        else:
            forward = functools.partial(_batched_feed_forward, hidden_fn=hidden_fn)
        if self.recompute_activations:
            return tf.recompute_grad(forward)(inputs, *weights)
        return forward(inputs, *weights)

    def _quantized_sorted_rows(self, inputs, expert_row_counts, hidden_fn):
        """Sorted rows through kernels stored in bfloat16 or int8 (not trainable, so
        inference only): each used expert's kernels dequantised in its own iteration."""
        kernels = {name: self._stored_kernel(name) for name in ("kernel_in", "kernel_out")}

        def matmul(rows, blocks, kernel_and_scale):
            return _dequantised_grouped_matmul(rows, blocks, *kernel_and_scale)

        return _grouped_general_feed_forward(
            inputs, kernels["kernel_in"], self._bias("bias_in", kernels["kernel_in"][0]),
            kernels["kernel_out"], self._bias("bias_out", kernels["kernel_out"][0]),
            expert_row_counts=expert_row_counts, hidden_fn=hidden_fn, matmul=matmul)

    @property
    def per_assignment_limit(self) -> int:
        """The most assignments a call should run through `per_assignment` rather than
        on sorted rows: the sorted rows cost a loop over the experts, gathering copies
        each assignment's kernels, so the limit grows with the experts and shrinks with
        their size. Calibrated on a 2-core CPU, where copying about 16k kernel weights
        cost what one expert of the loop does: 8 assignments for 32 experts of
        128 x 256 x 2 weights, 0 when one expert has more than 16k x experts weights
        (Mixtral's 8 experts of 176M)."""
        weights_per_expert = (math.prod(self.kernel_in.shape[1:])
                              + math.prod(self.kernel_out.shape[1:]))
        return PER_ASSIGNMENT_WEIGHTS_PER_EXPERT * self.num_experts // weights_per_expert

    def per_assignment(self, rows: tf.Tensor, expert_index: tf.Tensor) -> tf.Tensor:
        """Each row through its own expert, with that expert's weights gathered:
        `[rows, input_dim]` and int32 `[rows]` -> `[rows, output_size]`.

        For small inference calls (a generation step): a few ops whatever the number of
        experts, where sorting into blocks costs a loop over the experts; stored int8 or
        bfloat16 kernels are dequantised for the gathered rows only. Each row reads its
        expert's whole kernels, so large calls are faster on sorted rows.
        """
        kernel_in = self._kernel("kernel_in", expert_index)
        hidden = expert_hidden(
            tf.einsum("ad,adh->ah", rows, kernel_in)
            + tf.gather(self._bias("bias_in", kernel_in), expert_index),
            self.activation, self.gated)
        kernel_out = self._kernel("kernel_out", expert_index)
        return (tf.einsum("ah,aho->ao", hidden, kernel_out)
                + tf.gather(self._bias("bias_out", kernel_out), expert_index))

    def _bias(self, name: str, kernel: tf.Tensor) -> tf.Tensor:
        """Bias `name` as a tensor, or zeros `[experts, width]` without biases."""
        if self.use_bias:
            return tf.cast(getattr(self, name), self.compute_dtype)
        return tf.zeros([self.num_experts, kernel.shape[-1]], self.compute_dtype)

    def get_config(self):
        config = super().get_config()
        config.update(num_experts=self.num_experts, hidden_size=self.hidden_size,
                      output_size=self.output_size,
                      kernel_initializer=keras.initializers.serialize(
                          self.kernel_initializer),
                      bias_initializer=keras.initializers.serialize(self.bias_initializer),
                      recompute_activations=self.recompute_activations,
                      compiled_kernels=self.compiled_kernels,
                      kernel_storage=self.kernel_storage,
                      activation=keras.activations.serialize(self.activation),
                      gated=self.gated, use_bias=self.use_bias)
        return config


def quantize_per_output_channel(kernel: tf.Tensor):
    """Weight-only int8 of `[experts, fan_in, fan_out]` kernels: int8 round(w / scale),
    scale = max |w| over fan_in / 127 (`[experts, 1, fan_out]`; 1 where a column is 0)."""
    scale = tf.reduce_max(tf.abs(kernel), axis=1, keepdims=True) / 127.0
    scale = tf.where(scale > 0, scale, 1.0)
    quantized = tf.clip_by_value(tf.round(kernel / scale), -127.0, 127.0)
    return tf.cast(quantized, tf.int8), scale
