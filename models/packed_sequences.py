"""Right-padded sequences packed for inference without padding.

A batch of mixed lengths padded to its longest row is about half padding (the scored
test sentences: 8,420 real positions of 15,552 at batch 32). Packed, the rows are sorted
by length, longest first, and only their real positions are kept, time-major (the layout
of PyTorch's `PackedSequence`): the rows still running at step t are then the first
`batch_sizes[t]` rows, so an LSTM steps only those, and every other layer (embedding,
MoE, softmax) sees the real positions only.
"""

from typing import NamedTuple

import keras
import tensorflow as tf


class PackedSequences(NamedTuple):
    """The real positions of a right-padded batch, time-major over length-sorted rows.

    values: `[positions]` (or `[positions, ...]`): step 0 of every row, longest row
        first, then step 1 of the rows that have one, and so on.
    batch_sizes: int32 `[time]`: the rows running at each step, non-increasing; step t's
        positions are `values[sum(batch_sizes[:t]) : sum(batch_sizes[:t + 1])]`.
    indices: int64 `[positions, 2]`: each position's (row, step) in the padded batch.
    """

    values: tf.Tensor
    batch_sizes: tf.Tensor
    indices: tf.Tensor


def pack_sequences(ids: tf.Tensor) -> PackedSequences:
    """int `[batch, time]` ids, each row its real ids then padding (0) -> their
    `PackedSequences`. Every row's real ids come before its padding; a 0 inside a row
    would end it there."""
    running = tf.math.cumprod(tf.cast(ids != 0, tf.int32), axis=1)        # [batch, time]
    lengths = tf.reduce_sum(running, axis=1)
    order = tf.argsort(lengths, direction="DESCENDING", stable=True)  # [batch]
    by_step = tf.transpose(tf.gather(running, order))                 # [time, batch]
    step_and_rank = tf.where(by_step != 0)                           # time-major
    indices = tf.stack([tf.gather(tf.cast(order, tf.int64), step_and_rank[:, 1]),
                        step_and_rank[:, 0]], axis=1)                 # [positions, 2]
    return PackedSequences(values=tf.gather_nd(ids, indices),
                           batch_sizes=tf.reduce_sum(by_step, axis=1),
                           indices=indices)


def packed_lstm(layer: keras.layers.LSTM, inputs: tf.Tensor, batch_sizes: tf.Tensor, *,
                return_cell_states: bool = False):
    """`layer` at inference over packed sequences: `[positions, d]` -> `[positions,
    units]`, the outputs `layer(padded, mask=...)` gives at the real positions; with
    `return_cell_states`, also the cell state there `[positions, units]` (a row's state
    after its last position is then its output and cell state there).

    The input projection of every position is one matmul; the loop multiplies only the
    recurrent state of the rows still running (step t: the first `batch_sizes[t]`).
    """
    cell = layer.cell
    if layer.go_backwards or not layer.return_sequences:
        raise ValueError(f"packed_lstm runs forward LSTMs that return sequences; "
                         f"{layer.name} has go_backwards={layer.go_backwards}, "
                         f"return_sequences={layer.return_sequences}.")
    projected = tf.matmul(tf.cast(inputs, cell.compute_dtype), cell.kernel)
    if cell.use_bias:
        projected += cell.bias
    starts = tf.concat([[0], tf.cumsum(batch_sizes)], axis=0)
    steps = tf.shape(batch_sizes)[0]

    def step(t, h, c, outputs, cell_states):
        running = batch_sizes[t]
        z = projected[starts[t]:starts[t + 1]] + tf.matmul(h[:running],
                                                            cell.recurrent_kernel)
        z_input, z_forget, z_cell, z_output = tf.split(z, 4, axis=-1)
        c = (cell.recurrent_activation(z_forget) * c[:running]
             + cell.recurrent_activation(z_input) * cell.activation(z_cell))
        h = cell.recurrent_activation(z_output) * cell.activation(c)
        if return_cell_states:
            cell_states = cell_states.write(t, c)
        return t + 1, h, c, outputs.write(t, h), cell_states

    zeros = tf.zeros([tf.reduce_sum(batch_sizes[:1]), cell.units], cell.compute_dtype)
    state_shape = tf.TensorShape([None, cell.units])
    _, _, _, outputs, cell_states = tf.while_loop(
        lambda t, *_: t < steps, step,
        (0, zeros, zeros, _rows_per_step(cell.compute_dtype, steps, state_shape),
         _rows_per_step(cell.compute_dtype, steps, state_shape)),
        shape_invariants=(tf.TensorShape([]), state_shape, state_shape, None, None))
    outputs = tf.reshape(outputs.concat(), [-1, cell.units])
    if return_cell_states:
        return outputs, tf.reshape(cell_states.concat(), [-1, cell.units])
    return outputs


def _rows_per_step(dtype, steps, row_shape: tf.TensorShape) -> tf.TensorArray:
    """A TensorArray of `steps` entries of a varying number of rows (`row_shape`)."""
    return tf.TensorArray(dtype, size=steps, infer_shape=False, element_shape=row_shape)
