"""The experts' compiled CPU kernels, when built (`python -m moe_tf.kernels.build`)."""

import functools
import os

import tensorflow as tf

LIBRARY = os.path.join(os.path.dirname(__file__), "_grouped_feed_forward.so")


@functools.cache
def grouped_feed_forward_ops():
    """The loaded op library, or None when it has not been built (no compiler or no
    AVX-512 at install time): the layer then runs TensorFlow ops only."""
    if not os.path.exists(LIBRARY):
        return None
    try:
        return tf.load_op_library(LIBRARY)
    except tf.errors.NotFoundError as error:  # built for another TensorFlow
        raise ImportError(f"{LIBRARY} does not load ({error}); rebuild it with "
                          "`python -m moe_tf.kernels.build`") from error
