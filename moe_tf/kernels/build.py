"""Compiles the layer's CPU kernels: `python -m moe_tf.kernels.build`.

Builds `_moe_kernels.so` from the `.cc` files next to this file with the compiler and
flags of the installed TensorFlow. `make install` runs it. Where it cannot be built (no C++ compiler,
no AVX-512) it says so and builds nothing; the layer then runs TensorFlow ops only.
"""

import glob
import os
import shutil
import subprocess
import sys
from typing import Optional

import tensorflow as tf

from moe_tf.kernels import LIBRARY

# Every source next to this file, as the Makefile's dependency and setup.py's package data
# take them.
SOURCES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "*.cc")))


def cpu_has_avx512() -> bool:
    """True when this CPU has the AVX-512 subsets the kernels use (x86-64-v4)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f
                          if line.startswith("flags")), [])
    except OSError:
        return False
    return {"avx512f", "avx512dq", "avx512bw", "avx512vl"} <= set(flags)


def compiler() -> str:
    return os.environ.get("CXX", "g++")


def why_not_buildable() -> Optional[str]:
    """Why the kernels cannot be built here, or None when they can."""
    if not cpu_has_avx512():
        return "no AVX-512 on this CPU"
    if shutil.which(compiler()) is None:
        return f"no C++ compiler {compiler()!r} (set CXX, or install g++)"
    return None


def build(output: str = LIBRARY) -> None:
    """Compiles the kernels into `output`; raises CalledProcessError on failure."""
    command = [compiler(), "-shared", "-fPIC", "-O3",
               "-march=x86-64-v4", "-Wno-deprecated-declarations",
               "-Wno-interference-size", "-o", output + ".tmp", *SOURCES,
               *tf.sysconfig.get_compile_flags(), *tf.sysconfig.get_link_flags()]
    subprocess.run(command, check=True)
    os.replace(output + ".tmp", output)  # a reader never sees a half-written library


def main() -> int:
    reason = why_not_buildable()
    if reason:
        print(f"moe_tf.kernels.build: not built ({reason}); the layer will use "
              "TensorFlow ops only", file=sys.stderr)
        return 0
    build()
    print(f"moe_tf.kernels.build: built {LIBRARY}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
