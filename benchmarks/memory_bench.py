"""Peak memory of training a very large hierarchical MoE (the paper's Appendix D).

    python -m benchmarks.memory_bench                  # 4096 experts 512 -> 256 -> 512
    python -m benchmarks.memory_bench --optimizers factored --recompute both

One hierarchical layer (64 groups of 64 experts, 2 + 2 gating, about 1.07 B expert
parameters: 4 GiB of float32 weights) trains for a few steps on T tokens of d = 512 with a
mean-squared-error loss plus the balancing loss, under each combination of
- the optimizer: `adam` (Adam for every weight: two full-size slots per weight) or
  `factored` (`moe_tf.optimizers.FactoredAdam` for the experts' weights, Adam for the
  gates);
- `recompute_activations` of the layer (the experts' hidden activations recomputed on the
  backward pass instead of kept).
Every combination runs in a subprocess of its own and reports the peak RSS (VmHWM) of
building the layer (initialising 4 GiB of weights has its own transient peak) and, the
high-water mark reset after the build, of training; also the optimizer's state, the step
time and the loss.
"""

import argparse
import dataclasses
import itertools
import json
import math
import statistics
import sys
import time

import numpy as np

from benchmarks.layer_bench import (GIB, peak_rss_bytes, positive_int, print_worker_result,
                                    run_worker)


@dataclasses.dataclass(frozen=True)
class Config:
    optimizer: str = "factored"
    recompute_activations: bool = False
    num_experts: int = 4096
    num_groups: int = 64
    k: int = 2
    group_k: int = 2
    model_dim: int = 512
    hidden_size: int = 256
    tokens: int = 4096
    steps: int = 5


def measure(config: Config) -> dict:
    """Trains the layer of `config` for `config.steps` steps (plus one to trace)."""
    import keras
    import tensorflow as tf

    from moe_tf import SparselyGatedMoE
    from moe_tf.optimizers import FactoredAdam

    moe = SparselyGatedMoE(config.num_experts, config.k, config.hidden_size,
                           num_groups=config.num_groups, group_k=config.group_k,
                           recompute_activations=config.recompute_activations, seed=0)
    moe.build((None, config.model_dim))
    build_rss = peak_rss_bytes()
    # Linux: writing 5 resets VmHWM to the current RSS, so that what follows is training's.
    with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
        clear_refs.write("5")
    inputs = tf.random.stateless_normal([config.tokens, config.model_dim], seed=[1, 0])
    target = tf.sin(inputs @ tf.random.stateless_normal(
        [config.model_dim, config.model_dim], seed=[2, 0]))

    experts = moe.experts.trainable_weights
    others = [w for w in moe.trainable_weights if all(w is not e for e in experts)]
    if config.optimizer == "adam":
        groups = [(keras.optimizers.Adam(1e-3), experts + others)]
    else:
        groups = [(FactoredAdam(1e-3), experts), (keras.optimizers.Adam(1e-3), others)]
    for optimizer, variables in groups:
        optimizer.build(variables)  # variables are created outside the tf.function

    @tf.function
    def train_step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(moe(inputs, training=True) - target))
            total = loss + tf.add_n(moe.losses)
        variables = [v for _, group in groups for v in group]
        grads = iter(tape.gradient(total, variables))
        for optimizer, group in groups:
            optimizer.apply_gradients([(next(grads), v) for v in group])
        return loss

    losses, times = [], []
    for _ in range(config.steps + 1):
        start = time.perf_counter()
        losses.append(float(train_step()))
        times.append(time.perf_counter() - start)
    state = sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize
                for optimizer, _ in groups for v in optimizer.variables)
    return {"config": dataclasses.asdict(config), "build_rss": build_rss,
            "peak_rss": peak_rss_bytes(), "optimizer_state": state,
            "step_time": statistics.median(times[1:]), "losses": losses}


def format_table(results: list[dict]) -> str:
    rows = [["optimizer", "recompute_activations", "training peak RSS GiB",
             "build peak RSS GiB", "optimizer state GiB", "step s (median)",
             "loss first -> last"]]
    for result in results:
        config = result["config"]
        rows.append([config["optimizer"], str(config["recompute_activations"]),
                     f"{result['peak_rss'] / GIB:.2f}", f"{result['build_rss'] / GIB:.2f}",
                     f"{result['optimizer_state'] / GIB:.3f}",
                     f"{result['step_time']:.1f}",
                     f"{result['losses'][0]:.4f} -> {result['losses'][-1]:.4f}"])
    rows.insert(1, ["---"] * len(rows[0]))
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.memory_bench",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizers", choices=("adam", "factored", "both"),
                        default="both")
    parser.add_argument("--recompute", choices=("yes", "no", "both"), default="both",
                        help="recompute_activations of the layer")
    parser.add_argument("--experts", type=positive_int, default=Config.num_experts)
    parser.add_argument("--groups", type=positive_int, default=Config.num_groups)
    parser.add_argument("--tokens", type=positive_int, default=Config.tokens)
    parser.add_argument("--steps", type=positive_int, default=Config.steps)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.groups < Config.group_k:
        parser.error(f"--groups ({args.groups}) must be at least group_k = {Config.group_k}")
    if args.experts % args.groups or args.experts // args.groups < Config.k:
        parser.error(f"--experts ({args.experts}) must be a multiple of --groups "
                     f"({args.groups}) with at least k = {Config.k} experts per group")
    if args.worker:
        print_worker_result(measure(Config(**json.loads(args.worker))))
        return
    optimizers = ("adam", "factored") if args.optimizers == "both" else (args.optimizers,)
    recompute = {"yes": (True,), "no": (False,), "both": (False, True)}[args.recompute]
    results = []
    for optimizer, flag in itertools.product(optimizers, recompute):
        config = Config(optimizer=optimizer, recompute_activations=flag,
                        num_experts=args.experts, num_groups=args.groups,
                        tokens=args.tokens, steps=args.steps)
        print(f"running {config}", file=sys.stderr, flush=True)
        results.append(run_worker("benchmarks.memory_bench", dataclasses.asdict(config)))
    base = Config(num_experts=args.experts, num_groups=args.groups, tokens=args.tokens)
    print(f"hierarchical MoE: {base.num_experts} experts ({base.num_groups} groups), "
          f"{base.model_dim} -> {base.hidden_size} -> {base.model_dim}, k = {base.group_k} "
          f"+ {base.k}, T = {base.tokens}, {args.steps} steps after one traced step")
    print(format_table(results))


if __name__ == "__main__":
    main()
