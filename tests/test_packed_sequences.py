"""Packed sequences: the packing order against a NumPy reference, and the packed LSTM
equal to Keras's LSTM on the padded batch at every real position."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from models.packed_sequences import pack_sequences, packed_lstm

# Rows of lengths 2, 4, 0, 4, 1 (a tie between rows 1 and 3; an empty row).
IDS = np.array([[5, 6, 0, 0],
                [7, 8, 9, 1],
                [0, 0, 0, 0],
                [2, 3, 4, 5],
                [9, 0, 0, 0]], np.int32)


def numpy_packing(ids):
    """The reference: rows by decreasing length (ties in row order), then time-major."""
    lengths = (ids != 0).sum(axis=1)
    order = sorted(range(len(ids)), key=lambda row: -lengths[row])
    indices = [(row, step) for step in range(ids.shape[1]) for row in order
               if step < lengths[row]]
    batch_sizes = [(lengths > step).sum() for step in range(ids.shape[1])]
    return np.array([ids[r, s] for r, s in indices]), np.array(batch_sizes), indices


def test_packing_matches_numpy():
    packed = pack_sequences(tf.constant(IDS))
    values, batch_sizes, indices = numpy_packing(IDS)
    np.testing.assert_array_equal(packed.values, values)
    np.testing.assert_array_equal(packed.batch_sizes, batch_sizes)
    np.testing.assert_array_equal(packed.indices, indices)
    assert values.tolist() == [7, 2, 5, 9, 8, 3, 6, 9, 4, 1, 5]


def lstm_and_padded_inputs(lengths, activation="tanh", seed=0):
    rng = np.random.default_rng(seed)
    layer = keras.layers.LSTM(6, activation=activation, return_sequences=True)
    layer.build((None, None, 3))
    for weight in layer.weights:  # away from the small initial values
        weight.assign(rng.normal(0.0, 0.7, weight.shape).astype(np.float32))
    time = max(lengths)
    ids = np.zeros([len(lengths), time], np.int32)
    for row, length in enumerate(lengths):
        ids[row, :length] = rng.integers(1, 50, length)
    inputs = rng.normal(size=[len(lengths), time, 3]).astype(np.float32)
    return layer, tf.constant(ids), tf.constant(inputs * (ids != 0)[..., None])


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_packed_lstm_equals_keras_lstm_at_real_positions(activation):
    layer, ids, inputs = lstm_and_padded_inputs([3, 7, 1, 7, 4, 2], activation)
    expected = layer(inputs, mask=ids != 0)
    packed = pack_sequences(ids)
    got = packed_lstm(layer, tf.gather_nd(inputs, packed.indices), packed.batch_sizes)
    assert got.shape == (24, 6)
    np.testing.assert_allclose(got, tf.gather_nd(expected, packed.indices),
                               rtol=1e-5, atol=1e-6)


def test_packed_lstm_cell_states_end_each_row_in_keras_lstm_final_state():
    layer, ids, inputs = lstm_and_padded_inputs([3, 7, 1, 7, 4, 2])
    layer.return_state = True
    _, final_h, final_c = layer(inputs, mask=ids != 0)  # each row's state at its end
    packed = pack_sequences(ids)
    outputs, cell_states = packed_lstm(layer, tf.gather_nd(inputs, packed.indices),
                                       packed.batch_sizes, return_cell_states=True)
    assert outputs.shape == cell_states.shape == (24, 6)
    lengths = np.asarray(tf.reduce_sum(tf.cast(ids != 0, tf.int32), axis=1))
    last = [packed.indices.numpy().tolist().index([row, length - 1])
            for row, length in enumerate(lengths)]
    np.testing.assert_allclose(tf.gather(outputs, last), final_h, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(tf.gather(cell_states, last), final_c, rtol=1e-5, atol=1e-6)


def test_packed_lstm_in_a_graph_with_one_row():
    layer, ids, inputs = lstm_and_padded_inputs([5])
    packed = pack_sequences(ids)
    run = tf.function(lambda x, sizes: packed_lstm(layer, x, sizes))
    np.testing.assert_allclose(
        run(tf.gather_nd(inputs, packed.indices), packed.batch_sizes),
        layer(inputs)[0], rtol=1e-5, atol=1e-6)


def test_packed_lstm_refuses_a_backward_lstm():
    layer = keras.layers.LSTM(4, go_backwards=True, return_sequences=True)
    layer.build((None, None, 3))
    with pytest.raises(ValueError, match="go_backwards=True"):
        packed_lstm(layer, tf.zeros([2, 3]), tf.constant([1, 1]))
