"""TensorFlow's pooling CPU allocator, chosen for the processes that import moe_tf.

TensorFlow's default CPU allocator maps each large tensor afresh and unmaps it when it is
freed, so a large layer's weight gradients (1 GiB each for 512 experts of the paper's sizes)
are new memory at every step: one page fault per 4 KiB, half a million per step, which was
half of that layer's training step on a 2-core CPU (benchmarks/RESULTS.md, session 13).
TensorFlow's BFC allocator keeps freed memory in a pool instead. TensorFlow reads the choice
at the process's first CPU tensor, so it applies where moe_tf is imported before any tensor
is made; variables the user has set are kept (`TF_CPU_ALLOCATOR_USE_BFC=false` restores
TensorFlow's default).

Where TensorFlow turns oneDNN on by default (CPUs with AVX512_VNNI, AVX512_BF16 or AMX),
its default CPU allocator is oneDNN's, which pools large tensors already; the choice made
here matters on the others (AVX2 machines, older AVX-512 ones). `UNPOOLED` is the
environment of a process that maps every large tensor afresh on either kind, for
benchmarks that measure what the pool buys.
"""

import os
from typing import MutableMapping

USE_POOL = "TF_CPU_ALLOCATOR_USE_BFC"
POOL_LIMIT_MIB = "TF_CPU_BFC_MEM_LIMIT_IN_MB"
# oneDNN's allocator hands every tensor to the system allocator (glibc maps large ones
# afresh) instead of its own pool.
UNPOOLED = {USE_POOL: "false", "TF_ONEDNN_USE_SYSTEM_ALLOCATOR": "1"}


def physical_memory_mib() -> int:
    """This machine's memory in MiB."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // (1 << 20)


def prefer_pooled_cpu_allocator(environ: MutableMapping[str, str] = os.environ) -> None:
    """Asks TensorFlow for its pooling CPU allocator, bounded by the machine's memory (its
    own default bound is 64 GiB, below what a large host may need), unless set already."""
    environ.setdefault(USE_POOL, "true")
    environ.setdefault(POOL_LIMIT_MIB, str(physical_memory_mib()))
