"""The checks every layer of the project goes through (in the manner of keras-hub).

`run_layer_test` builds the layer from keyword arguments and checks:
- the output shape of an eager call, and of a call on symbolic `keras.Input`s
  (`compute_output_shape` and the functional API agree with the real call);
- `expected_num_trainable_weights` / `expected_num_non_trainable_weights`, when given;
- `expected_num_losses`: the number of losses one training call adds (none at inference);
- `get_config` / `from_config` round trip to an identical config;
- a Keras model holding the layer saved to a `.keras` file and loaded back gives the same
  inference outputs (skipped for layers whose outputs are not a tensor);
- `run_training_test`: the layer inside a compiled model takes one `fit` step, and that
  step changes its trainable weights;
- under the `mixed_float16` and `mixed_bfloat16` policies the layer runs, its outputs have
  the policy's compute dtype (or `mixed_output_dtype`, for layers that always compute in
  float32), its variables stay float32, and every sublayer computes in the policy's dtype
  except those named in `float32_sublayers`; `check_mixed_precision` adds layer-specific
  checks.
`output_of` picks the tensor to check from layers that return a structure.
`seed_scrambling_xors` tells whether a compiled call draws its random numbers with Philox
named (`moe_tf.philox`).
The global dtype policy is never changed here: policies go to the layer's `dtype`.
"""

import os
import re
import tempfile
from typing import Callable, Collection, Optional

import keras
import numpy as np
import tensorflow as tf


def run_layer_test(layer_cls, *, init_kwargs: dict, input_data: np.ndarray,
                   expected_output_shape: tuple, input_batch_dims: int = 1,
                   call_kwargs: Optional[dict] = None, run_saving_test: bool = True,
                   run_training_test: bool = True,
                   expected_num_trainable_weights: Optional[int] = None,
                   expected_num_non_trainable_weights: Optional[int] = None,
                   expected_num_losses: Optional[int] = None,
                   float32_sublayers: Collection[str] = (),
                   check_mixed_precision: Optional[Callable] = None,
                   output_of: Callable = lambda output: output,
                   mixed_output_dtype: Optional[str] = None, atol: float = 1e-6):
    """Runs the shared checks; returns the float32 layer's inference output."""
    call_kwargs = call_kwargs or {}
    layer = layer_cls(**init_kwargs)
    output = output_of(layer(input_data, **call_kwargs))
    assert tuple(output.shape) == tuple(expected_output_shape), (
        output.shape, expected_output_shape)
    _check_weight_counts(layer, expected_num_trainable_weights,
                         expected_num_non_trainable_weights)
    if expected_num_losses is not None:
        _check_num_losses(layer_cls, init_kwargs, input_data, call_kwargs,
                          expected_num_losses)

    config = layer.get_config()
    revived = layer_cls.from_config(config)
    assert revived.get_config() == config

    if run_saving_test:
        _check_symbolic_call(layer_cls(**init_kwargs), input_data, input_batch_dims,
                             call_kwargs, expected_output_shape)
        _check_keras_file_round_trip(layer, input_data, input_batch_dims, call_kwargs,
                                     atol)
    if run_training_test:
        _check_fit_step(layer_cls(**init_kwargs), input_data, input_batch_dims,
                        call_kwargs, output_of)

    for policy in ("mixed_float16", "mixed_bfloat16"):
        mixed = layer_cls(**{**init_kwargs, "dtype": policy})
        mixed_output = output_of(mixed(input_data, **call_kwargs))
        expected_dtype = mixed_output_dtype or keras.DTypePolicy(policy).compute_dtype
        assert mixed_output.dtype == expected_dtype, (policy, mixed_output.dtype)
        assert np.all(np.isfinite(np.asarray(tf.cast(mixed_output, tf.float32))))
        for weight in mixed.weights:
            assert weight.dtype == "float32", (policy, weight.path, weight.dtype)
        _check_sublayer_dtypes(mixed, policy, float32_sublayers)
        if check_mixed_precision is not None:
            check_mixed_precision(mixed, input_data)
    return output


def _check_weight_counts(layer, trainable, non_trainable):
    if trainable is not None:
        assert len(layer.trainable_weights) == trainable, (
            [w.path for w in layer.trainable_weights], trainable)
    if non_trainable is not None:
        assert len(layer.non_trainable_weights) == non_trainable, (
            [w.path for w in layer.non_trainable_weights], non_trainable)


def _check_num_losses(layer_cls, init_kwargs, input_data, call_kwargs, expected):
    layer = layer_cls(**init_kwargs)
    layer(input_data, **call_kwargs)
    assert layer.losses == [], "an inference call added losses"
    layer(input_data, training=True, **call_kwargs)
    assert len(layer.losses) == expected, (layer.losses, expected)


def _symbolic_inputs(input_data, input_batch_dims):
    return keras.Input(shape=input_data.shape[input_batch_dims:],
                       batch_size=(input_data.shape[0] if input_batch_dims == 1 else None),
                       dtype=str(input_data.dtype))


def _check_symbolic_call(layer, input_data, input_batch_dims, call_kwargs,
                         expected_output_shape):
    symbolic = layer(_symbolic_inputs(input_data, input_batch_dims), **call_kwargs)
    for got, want in zip(symbolic.shape, expected_output_shape):
        assert got is None or got == want, (symbolic.shape, expected_output_shape)
    assert len(symbolic.shape) == len(expected_output_shape)


def _check_keras_file_round_trip(layer, input_data, input_batch_dims, call_kwargs, atol):
    inputs = _symbolic_inputs(input_data, input_batch_dims)
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


def _check_fit_step(layer, input_data, input_batch_dims, call_kwargs, output_of):
    """One compiled `fit` step on a squared-output loss changes the trainable weights."""
    inputs = _symbolic_inputs(input_data, input_batch_dims)
    model = keras.Model(inputs, output_of(layer(inputs, **call_kwargs)))
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    before = [np.asarray(w) for w in layer.trainable_weights]
    if not before:
        return
    # A target far from the output: every weight the output depends on gets a gradient.
    target = np.asarray(model(input_data)) + 1.0
    history = model.fit(input_data, target, batch_size=len(input_data), epochs=1,
                        verbose=0)
    assert np.isfinite(history.history["loss"][0])
    changed = [not np.array_equal(b, np.asarray(w))
               for b, w in zip(before, layer.trainable_weights)]
    assert any(changed), "a fit step changed no trainable weight"


def _check_sublayer_dtypes(layer, policy, float32_sublayers):
    compute_dtype = keras.DTypePolicy(policy).compute_dtype
    for sublayer in layer._flatten_layers(include_self=False):
        want = "float32" if sublayer.name in float32_sublayers else compute_dtype
        assert sublayer.compute_dtype == want, (policy, sublayer.name,
                                                sublayer.compute_dtype)


def seed_scrambling_xors(function, *args) -> int:
    """xor ops in the HLO XLA compiles `function(*args)` from: TensorFlow's
    auto-selected algorithm derives its key and counter from the seed by rounds of xors
    (and compiles 20x slower on a CPU); Philox named has none before XLA's own
    expansion."""
    compiled = tf.function(function, jit_compile=True)
    return len(re.findall(r" xor\(", compiled.experimental_get_compiler_ir(*args)(
        stage="hlo")))
