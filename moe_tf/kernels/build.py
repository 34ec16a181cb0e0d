"""Compiles the layer's CPU kernels: `python -m moe_tf.kernels.build`.

Builds `_moe_kernels.<march>.so` from the `.cc` files next to this file with the compiler
and flags of the installed TensorFlow, for the vector instructions of this CPU: AVX-512
(`-march=x86-64-v4`) or AVX2 with FMA (`x86-64-v3`; simd.h holds both). `make install` runs it. Where it
cannot be built (no C++ compiler, neither instruction set) it says so and builds nothing;
the layer then runs TensorFlow ops only. The library's name says its instruction set, and
the layer loads the one for the CPU it runs on, so machines of both kinds can share one
checkout (each builds its own).
"""

import concurrent.futures
import glob
import os
import shutil
import subprocess
import sys
import tempfile
from typing import Optional, Sequence

import tensorflow as tf

from moe_tf.kernels import LIBRARY, target_march

# Every source next to this file, as the Makefile's dependency and setup.py's package data
# take them (simd.h is included by both).
SOURCES = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "*.cc")))
# Declarations that XLA's headers need and TensorFlow's wheel lacks (see its README).
XLA_HEADER_STUBS = os.path.join(os.path.dirname(__file__), "xla_header_stubs")

def compiler() -> str:
    return os.environ.get("CXX", "g++")


def why_not_buildable() -> Optional[str]:
    """Why the kernels cannot be built here, or None when they can."""
    if target_march() is None:
        return "this CPU has neither AVX-512 nor AVX2 with FMA"
    if shutil.which(compiler()) is None:
        return f"no C++ compiler {compiler()!r} (set CXX, or install g++)"
    return None


def system_include(flag: str) -> str:
    """TensorFlow's include directory as a system one: its headers' own warnings (XLA's
    are many) are not this build's."""
    return "-isystem" + flag[2:] if flag.startswith("-I") else flag


def compile_flags(march: str) -> list[str]:
    return ["-fPIC", "-O3", f"-march={march}", "-Wno-deprecated-declarations",
            "-Wno-interference-size", f"-I{XLA_HEADER_STUBS}",
            *map(system_include, tf.sysconfig.get_compile_flags())]


def compile_object(source: str, march: str, directory: str) -> str:
    """Compiles `source` into an object file in `directory`; returns its path."""
    name = os.path.join(directory, os.path.basename(source) + ".o")
    subprocess.run([compiler(), "-c", *compile_flags(march), "-o", name, source], check=True)
    return name


def build(output: str = LIBRARY, march: Optional[str] = None,
          sources: Sequence[str] = SOURCES) -> None:
    """Compiles `sources` (default: all) into `output` for `-march=<march>` (default: this
    CPU's); raises CalledProcessError on failure. The sources compile side by side, one
    per core (the XLA glue alone takes about half of a serial build)."""
    march = march or target_march()
    with tempfile.TemporaryDirectory() as directory, \
            concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
        objects = list(pool.map(lambda source: compile_object(source, march, directory),
                                sources))
        # libtensorflow_cc holds XLA's op-kernel classes, which xla_custom_calls.cc extends.
        subprocess.run([compiler(), "-shared", "-o", output + ".tmp", *objects,
                        *tf.sysconfig.get_link_flags(), "-l:libtensorflow_cc.so.2"],
                       check=True)
    os.replace(output + ".tmp", output)  # a reader never sees a half-written library


def main() -> int:
    reason = why_not_buildable()
    if reason:
        print(f"moe_tf.kernels.build: not built ({reason}); the layer will use "
              "TensorFlow ops only", file=sys.stderr)
        return 0
    build()
    print(f"moe_tf.kernels.build: built {LIBRARY} (-march={target_march()})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
