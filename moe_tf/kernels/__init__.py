"""The layer's compiled CPU kernels, when built (`python -m moe_tf.kernels.build`).

`grouped_feed_forward.cc`: the experts' FFNs, forward and backward. `weighted_row_sum.cc`:
the sparse dispatch's gate-weighted sums of rows per token, and their gradient.
"""

import functools
import os

import tensorflow as tf

LIBRARY = os.path.join(os.path.dirname(__file__), "_moe_kernels.so")


@functools.cache
def op_library():
    """The loaded op library, or None when it has not been built (no compiler or no
    AVX-512 at install time): the layer then runs TensorFlow ops only."""
    if not os.path.exists(LIBRARY):
        return None
    try:
        return tf.load_op_library(LIBRARY)
    except tf.errors.NotFoundError as error:  # built for another TensorFlow
        raise ImportError(f"{LIBRARY} does not load ({error}); rebuild it with "
                          "`python -m moe_tf.kernels.build`") from error


def op_library_for(*tensors):
    """The op library when it suits these operands, else None: it must be built, the
    operands float32 (the ops are float32 only), and no GPU visible (the ops are
    CPU-only; on a GPU machine they would pull the layer's work back to the host)."""
    if tf.config.list_logical_devices("GPU"):
        return None
    if any(t.dtype != tf.float32 for t in tensors):
        return None
    return op_library()
