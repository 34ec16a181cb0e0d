"""The checks every layer of the project goes through (in the manner of keras-hub).

`run_layer_test` builds the layer from keyword arguments and checks:
- `get_config` / `from_config` round trip to an identical config;
- a Keras model holding the layer saved to a `.keras` file and loaded back gives the same
  inference outputs (skipped for layers whose outputs are not a tensor);
- under the `mixed_float16` and `mixed_bfloat16` policies the layer runs, its outputs have
  the policy's compute dtype (or `mixed_output_dtype`, for layers that always compute in
  float32) and its variables stay float32; `check_mixed_precision` adds layer-specific
  checks.
`output_of` picks the tensor to check from layers that return a structure.
The global dtype policy is never changed here: policies go to the layer's `dtype`.
"""

import os
import tempfile
from typing import Callable, Optional

import keras
import numpy as np
import tensorflow as tf


def run_layer_test(layer_cls, *, init_kwargs: dict, input_data: np.ndarray,
                   expected_output_shape: tuple, input_batch_dims: int = 1,
                   call_kwargs: Optional[dict] = None, run_saving_test: bool = True,
                   check_mixed_precision: Optional[Callable] = None,
                   output_of: Callable = lambda output: output,
                   mixed_output_dtype: Optional[str] = None, atol: float = 1e-6):
    """Runs the shared checks; returns the float32 layer's inference output."""
    call_kwargs = call_kwargs or {}
    layer = layer_cls(**init_kwargs)
    output = output_of(layer(input_data, **call_kwargs))
    assert tuple(output.shape) == tuple(expected_output_shape), (
        output.shape, expected_output_shape)

    config = layer.get_config()
    revived = layer_cls.from_config(config)
    assert revived.get_config() == config

    if run_saving_test:
        _check_keras_file_round_trip(layer, input_data, input_batch_dims, call_kwargs,
                                     atol)

    for policy in ("mixed_float16", "mixed_bfloat16"):
        mixed = layer_cls(**{**init_kwargs, "dtype": policy})
        mixed_output = output_of(mixed(input_data, **call_kwargs))
        expected_dtype = mixed_output_dtype or keras.DTypePolicy(policy).compute_dtype
        assert mixed_output.dtype == expected_dtype, (policy, mixed_output.dtype)
        assert np.all(np.isfinite(np.asarray(tf.cast(mixed_output, tf.float32))))
        for weight in mixed.weights:
            assert weight.dtype == "float32", (policy, weight.path, weight.dtype)
        if check_mixed_precision is not None:
            check_mixed_precision(mixed, input_data)
    return output


def _check_keras_file_round_trip(layer, input_data, input_batch_dims, call_kwargs, atol):
    inputs = keras.Input(shape=input_data.shape[input_batch_dims:],
                         batch_size=(input_data.shape[0] if input_batch_dims == 1
                                     else None),
                         dtype=str(input_data.dtype))
    model = keras.Model(inputs, layer(inputs, **call_kwargs))
    expected = model(input_data, training=False)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "model.keras")
        model.save(path)
        loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(np.asarray(loaded(input_data, training=False)),
                               np.asarray(expected), atol=atol)
    for original, restored in zip(model.weights, loaded.weights):
        np.testing.assert_array_equal(np.asarray(original), np.asarray(restored))
