"""Random draws that name the Philox algorithm, so that XLA compiles them well.

Keras's random ops (`keras.random.normal`, `keras.layers.Dropout`) leave the algorithm of
TensorFlow's stateless ops to TensorFlow ("auto_select"). Without XLA a CPU then draws by
Philox; under XLA on a CPU the same draw compiles to a program about 20x slower (a
`[64, 64, 128]` dropout mask: 129 against 7 ms with Philox named). Four such masks were
half of the default language model's XLA training step, and the gate's noise a quarter of
an E = 512 layer's. Naming Philox draws exactly the numbers Keras draws without XLA
(tested) and compiles to the fast program under XLA.
"""

from typing import Optional, Sequence

import keras
import tensorflow as tf


def int32_seed(seed: tf.Tensor) -> tf.Tensor:
    """A Keras seed generator's int64 `[2]` state as the int32 seed TensorFlow's stateless
    ops take under XLA, folded as Keras folds it (so the draws are the ones Keras makes)."""
    return tf.cast(tf.math.floormod(seed, tf.int32.max - 1), tf.int32)


def normal(shape, seed_generator: keras.random.SeedGenerator) -> tf.Tensor:
    """float32 standard normal `shape`: `keras.random.normal(shape, seed=seed_generator)`
    by Philox."""
    return tf.random.stateless_normal(shape, seed=int32_seed(seed_generator.next()),
                                      dtype=tf.float32, alg="philox")


def _noise_shape(inputs: tf.Tensor, noise_shape: Optional[Sequence]) -> tf.Tensor:
    """`noise_shape` with its `None` entries taken from `inputs` (Keras's convention)."""
    if noise_shape is None:
        return tf.shape(inputs)
    return tf.stack([tf.shape(inputs)[axis] if size is None else size
                     for axis, size in enumerate(noise_shape)])


@keras.saving.register_keras_serializable(package="moe_tf")
class PhiloxDropout(keras.layers.Dropout):
    """`keras.layers.Dropout` whose mask is drawn by Philox by name (see the module
    docstring): the same masks as Keras's layer of the same seed without XLA, and a fast
    generator under XLA. Arguments and config as `keras.layers.Dropout`'s.
    """

    def call(self, inputs, *, training=None):
        """`inputs` of any shape; training: kept entries scaled by 1 / (1 - rate)."""
        if not training or self.rate == 0:
            return inputs
        if self.rate == 1:
            return tf.zeros_like(inputs)
        return tf.nn.experimental.stateless_dropout(
            inputs, rate=self.rate, noise_shape=_noise_shape(inputs, self.noise_shape),
            seed=int32_seed(self.seed_generator.next()), rng_alg="philox")
