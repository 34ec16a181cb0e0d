"""The layer's compiled CPU kernels, when built (`python -m moe_tf.kernels.build`).

`grouped_feed_forward.cc`: the experts' FFNs, forward and backward; inside a program XLA
compiles they run as XLA custom calls (`xla_custom_calls.cc`). `weighted_row_sum.cc`:
the sparse dispatch's gate-weighted sums of rows per token, and their gradient.
"""

import functools
import os
from typing import Optional

import tensorflow as tf
from tensorflow.python.ops import control_flow_util

# The -march levels the kernels are written for, best first, with the /proc/cpuinfo flags
# each needs (x86-64-v4 implies v3's).
_X86_64_V3 = {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"}
TARGETS = (("x86-64-v4", _X86_64_V3 | {"avx512f", "avx512dq", "avx512bw", "avx512vl",
                                        "avx512cd"}),
           ("x86-64-v3", _X86_64_V3))


def cpu_flags() -> set:
    """This CPU's feature flags (empty where /proc/cpuinfo cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            return set(next((line.split(":", 1)[1].split() for line in f
                             if line.startswith("flags")), []))
    except OSError:
        return set()


def target_march(flags: Optional[set] = None) -> Optional[str]:
    """The -march the kernels are built with on a CPU with `flags` (default: this one's),
    or None when it has neither AVX-512 nor AVX2 with FMA."""
    flags = cpu_flags() if flags is None else flags
    return next((march for march, needs in TARGETS if needs <= flags), None)


def library_path(march: str) -> str:
    """Where the library built with `-march=<march>` is."""
    return os.path.join(os.path.dirname(__file__), f"_moe_kernels.{march}.so")


# The library for this CPU, or None where none can be built.
LIBRARY = None if target_march() is None else library_path(target_march())


@functools.cache
def op_library():
    """The loaded op library, or None when it has not been built (no compiler, or
    neither AVX-512 nor AVX2 at install time): the layer then runs TensorFlow ops only."""
    if LIBRARY is None or not os.path.exists(LIBRARY):
        return None
    try:
        return tf.load_op_library(LIBRARY)
    except tf.errors.NotFoundError as error:  # built for another TensorFlow
        raise ImportError(f"{LIBRARY} does not load ({error}); rebuild it with "
                          "`python -m moe_tf.kernels.build`") from error


def op_library_for(*tensors, required: bool = False):
    """The op library when it suits these operands, else None: it must be built, the
    operands float32 (the ops are float32 only), and no GPU visible (the ops are
    CPU-only; on a GPU machine they would pull the layer's work back to the host).

    With `required` (compiled_kernels=True), a ValueError naming the reason instead of
    None.
    """
    reason = unsuitable_reason(*tensors)
    if reason is not None and required:
        raise ValueError(f"compiled_kernels=True, but the compiled kernels cannot run: "
                         f"{reason}. Pass compiled_kernels='auto' to use them only where "
                         f"they apply.")
    return None if reason is not None else op_library()


def unsuitable_reason(*tensors):
    """Why the compiled kernels cannot run on these operands, or None if they can."""
    if tf.config.list_logical_devices("GPU"):
        return "a GPU is visible (the kernels are CPU-only)"
    for tensor in tensors:
        if tensor.dtype != tf.float32:
            return f"an operand is {tensor.dtype.name} (the kernels are float32 only)"
    if op_library() is None:
        return ("they are not built (they need AVX-512 or AVX2 with FMA and a C++ "
                "compiler; build them with "
                "`python -m moe_tf.kernels.build`)")
    return None


def compiling_with_xla() -> bool:
    """Whether the graph being traced is one XLA compiles (`jit_compile=True`): there the
    experts' kernels run as custom calls, and TensorFlow ops without an XLA kernel (the
    layer's loops over the experts) cannot run."""
    # TensorFlow has no public way to ask this.
    return control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph())
