"""moe_tf asks TensorFlow for its pooling CPU allocator: a large result made again and again
reuses its memory instead of faulting in fresh pages each time."""

import os
import subprocess
import sys

import pytest

from moe_tf import cpu_allocator

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# In a fresh process: import moe_tf first (as a user's script does), then make a 256 MiB
# result three times and print the minor page faults each one cost.
FAULTS_PER_RESULT = """
import resource
import moe_tf
import tensorflow as tf
double = tf.function(lambda x: x * 2.0)
x = tf.ones([64 << 20])
double(x)[0].numpy()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):
    double(x)[0].numpy()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3)
"""
PAGES_PER_RESULT = (256 << 20) // os.sysconf("SC_PAGE_SIZE")


def faults_per_result(**environment) -> float:
    env = {k: v for k, v in os.environ.items()
           if k not in (cpu_allocator.POOL_LIMIT_MIB, *cpu_allocator.UNPOOLED)}
    result = subprocess.run([sys.executable, "-c", FAULTS_PER_RESULT], cwd=ROOT,
                            env=dict(env, TF_CPP_MIN_LOG_LEVEL="3", **environment),
                            capture_output=True, text=True, timeout=120, check=True)
    return float(result.stdout.split()[-1])


def test_prefer_pooled_cpu_allocator_keeps_what_the_user_set():
    environ = {}
    cpu_allocator.prefer_pooled_cpu_allocator(environ)
    assert environ == {"TF_CPU_ALLOCATOR_USE_BFC": "true",
                       "TF_CPU_BFC_MEM_LIMIT_IN_MB": str(cpu_allocator.physical_memory_mib())}
    assert 1024 < cpu_allocator.physical_memory_mib() < (1 << 32)
    environ = {"TF_CPU_ALLOCATOR_USE_BFC": "false", "TF_CPU_BFC_MEM_LIMIT_IN_MB": "512"}
    cpu_allocator.prefer_pooled_cpu_allocator(environ)
    assert environ == {"TF_CPU_ALLOCATOR_USE_BFC": "false", "TF_CPU_BFC_MEM_LIMIT_IN_MB": "512"}


@pytest.mark.slow
def test_importing_moe_tf_pools_large_tensors():
    # Pooled: the result's memory is reused (a few pages of bookkeeping at most).
    assert faults_per_result() < 0.05 * PAGES_PER_RESULT
    # Unpooled (TensorFlow's default where oneDNN is off): every page of every result faults.
    assert faults_per_result(**cpu_allocator.UNPOOLED) > 0.5 * PAGES_PER_RESULT
