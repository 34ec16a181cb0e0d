"""Inference time of the MoE layer with int8 and bfloat16 experts against float32.

    python -m benchmarks.quantized_experts_bench              # 1, 8 and 256 tokens a call
    python -m benchmarks.quantized_experts_bench --tokens 1 --calls 50

One `SparselyGatedMoE` (the default language model's: 32 experts, k = 4, hidden 256,
d = 128, sparse dispatch) and copies of it with the experts' kernels stored in bfloat16
and int8 (`quantize_experts`), the same weights; each called in inference inside a
`tf.function`, alternating call by call; the ratio is the median call time over
float32's. One token a call is a generation step of a batch-1 `generate`; calls of up to
`per_assignment_limit` assignments (2 tokens here) multiply by gathered weights, and the
last column times the float32 layer with every call on sorted rows, as before that path.
"""

import argparse
import statistics
import time
from typing import Dict

import numpy as np
import tensorflow as tf

from moe_tf import SparselyGatedMoE, dispatch

STORAGES = ("float32", "bfloat16", "int8")


def measure(tokens: int, calls: int, *, num_experts: int = 32, k: int = 4,
            hidden_size: int = 256, model_dim: int = 128) -> Dict[str, float]:
    """Median milliseconds per inference call, by kernel storage."""
    layers = {}
    for storage in STORAGES:
        layers[storage] = SparselyGatedMoE(num_experts, k, hidden_size, seed=0)
        layers[storage].build((None, model_dim))
        layers[storage].set_weights(layers["float32"].get_weights())
        if storage != "float32":
            layers[storage].quantize_experts(storage)
    x = tf.constant(np.random.default_rng(0).normal(size=(tokens, model_dim)), tf.float32)
    calls_of = {storage: tf.function(lambda x, layer=layer: layer(x, training=False))
                for storage, layer in layers.items()}
    # The float32 layer's call with every size on sorted rows (no gathered weights).
    sorted_rows = layers["float32"]
    calls_of["float32, sorted rows"] = tf.function(lambda x: dispatch.sparse_dispatch(
        x, sorted_rows.gate(x, training=False).routing, sorted_rows.experts))
    times = {name: [] for name in calls_of}
    for call in calls_of.values():
        call(x)
    for _ in range(calls):
        for name, call in calls_of.items():
            start = time.perf_counter()
            call(x)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1e3 for name, t in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 256])
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args(argv)
    print("| tokens a call | float32 ms | bfloat16 ms (ratio) | int8 ms (ratio) | "
          "float32 on sorted rows ms (ratio) |")
    print("|---|---|---|---|---|")
    for tokens in args.tokens:
        ms = measure(tokens, args.calls)
        sorted_rows = ms["float32, sorted rows"]
        print(f"| {tokens} | {ms['float32']:.3f} | {ms['bfloat16']:.3f} "
              f"({ms['bfloat16'] / ms['float32']:.2f}x) | {ms['int8']:.3f} "
              f"({ms['int8'] / ms['float32']:.2f}x) | {sorted_rows:.3f} "
              f"({sorted_rows / ms['float32']:.2f}x) |")


if __name__ == "__main__":
    main()
