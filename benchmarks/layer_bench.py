"""One MoE layer against a FLOP-matched dense FFN: step time, throughput, peak memory.

    python -m benchmarks.layer_bench                  # E = 8, 64, 512; sparse and capacity
    python -m benchmarks.layer_bench --quick          # E = 8, 64; sparse; under a minute
    python -m benchmarks.layer_bench --tokens 16384 --experts 512
    python -m benchmarks.layer_bench --allocator tcmalloc   # tcmalloc for every tensor
    python -m benchmarks.layer_bench --allocator unpooled   # every large tensor mapped afresh

A step is one layer's forward and backward pass inside a `tf.function`: the loss
sum(y * dy) (plus the balancing loss for the MoE) and its gradients for the inputs and for
every weight. The defaults are the paper's language-model layer: T = 4096 tokens of
d = 512, experts 512 -> 1024 -> 512, k = 4, float32, training mode. The gates keep their
zero initialisation, so the gating noise sends every token to k random experts: a load as
balanced as a trained layer's. The dense baseline is the FLOP-matched FFN
512 -> k * 1024 -> 512, which does per token the matmuls of the k selected experts.

Every configuration runs in a subprocess of its own, so that its peak RSS (the process's
VmHWM, read after the warm-up steps) is its own. A MoE configuration's ratio is its median
step time over the median of the dense baseline timed in the same subprocess, the two
alternating step by step so that other load on the machine hits both alike; the CPU-time
ratio (process CPU time per step, all threads) and the ratio of the two minimum step times
(the steps least disturbed) are less sensitive to such load. GFLOP/s
counts only the useful matmuls: 3 x 2 x tokens x k x (d x hidden + hidden x d) per step
(each forward matmul and its two backward ones); the gate's matmul is not counted.
"""

import argparse
import ctypes.util
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Optional, Union

_RESULT_PREFIX = "LAYER_BENCH_RESULT "
GIB = 2.0 ** 30


@dataclasses.dataclass(frozen=True)
class Config:
    """One benchmarked layer; `num_experts=None` is the dense baseline."""

    num_experts: Optional[int] = None
    dispatch: str = "sparse"
    capacity_group_size: Optional[int] = None  # the capacity path's token groups
    capacity_factor: Optional[float] = None  # the capacity path's slots (layer default)
    jit_compile: bool = False  # both the layer's and the dense baseline's step under XLA
    tokens: int = 4096
    model_dim: int = 512
    hidden_size: int = 1024
    k: int = 4
    dtype: str = "float32"
    recompute_activations: bool = False
    compiled_kernels: Union[str, bool] = "auto"
    allocator: str = "tensorflow"
    steps: int = 10
    warmup: int = 3

    @property
    def name(self) -> str:
        return "dense FFN" if self.num_experts is None else f"MoE E={self.num_experts}"

    @property
    def useful_flops(self) -> float:
        """Forward and backward FLOPs of the selected experts' (or the dense) matmuls."""
        return 3 * 2 * self.tokens * self.k * 2 * self.model_dim * self.hidden_size


def allocator_environment(allocator: str) -> dict:
    """Environment variables that make a worker process use `allocator`.

    "tensorflow": TensorFlow's pooling (BFC) CPU allocator, which importing moe_tf selects
    (moe_tf/cpu_allocator.py); nothing to set.
    "unpooled": every large tensor mapped afresh (TensorFlow's default CPU allocator where
    oneDNN is off; moe_tf.cpu_allocator.UNPOOLED).
    "tcmalloc": every tensor from tcmalloc (preloaded; the oneDNN build's
    TF_ONEDNN_USE_SYSTEM_ALLOCATOR=1 sends the tensors to the system allocator).
    """
    if allocator == "tensorflow":
        return {}
    if allocator == "unpooled":
        from moe_tf import cpu_allocator  # here only: the parent process needs no TensorFlow

        return dict(cpu_allocator.UNPOOLED)
    library = ctypes.util.find_library("tcmalloc_minimal") or ctypes.util.find_library(
        "tcmalloc")
    if library is None:
        raise ValueError("--allocator tcmalloc: no tcmalloc library found (on Debian or "
                         "Ubuntu: apt-get install libtcmalloc-minimal4)")
    return {"LD_PRELOAD": library, "TF_ONEDNN_USE_SYSTEM_ALLOCATOR": "1"}


def loaded_allocator() -> str:
    """"tcmalloc" when tcmalloc is mapped into this process, else "unpooled" where
    the environment is moe_tf.cpu_allocator.UNPOOLED, else "tensorflow"."""
    from moe_tf import cpu_allocator

    with open("/proc/self/maps", encoding="ascii", errors="replace") as maps:
        if "libtcmalloc" in maps.read():
            return "tcmalloc"
    unpooled = all(os.environ.get(name) == value
                   for name, value in cpu_allocator.UNPOOLED.items())
    return "unpooled" if unpooled else "tensorflow"


def peak_rss_bytes() -> int:
    """The process's peak resident set size (VmHWM), in bytes."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (needs Linux)")


def training_step(config: Config) -> Callable[[], None]:
    """Builds the layer of `config` and returns a function running one training step."""
    import keras
    import tensorflow as tf

    from moe_tf import SparselyGatedMoE

    policy = "float32" if config.dtype == "float32" else f"mixed_{config.dtype}"
    if config.num_experts is None:
        hidden = keras.layers.Dense(config.k * config.hidden_size, activation="relu",
                                    dtype=policy)
        output = keras.layers.Dense(config.model_dim, dtype=policy)
        model = keras.Sequential([hidden, output])
    else:
        model = SparselyGatedMoE(config.num_experts, config.k, config.hidden_size,
                                 dispatch=config.dispatch,
                                 capacity_group_size=config.capacity_group_size,
                                 capacity_factor=config.capacity_factor,
                                 recompute_activations=config.recompute_activations,
                                 compiled_kernels=config.compiled_kernels,
                                 dtype=policy, seed=0)
    model.build((None, config.model_dim))
    weights = model.trainable_weights
    inputs = tf.random.stateless_normal([config.tokens, config.model_dim], seed=[1, 0])
    d_outputs = tf.random.stateless_normal([config.tokens, config.model_dim], seed=[2, 0])

    @tf.function(jit_compile=config.jit_compile)
    def step(inputs, d_outputs):
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            outputs = tf.cast(model(inputs, training=True), tf.float32)
            loss = tf.reduce_sum(outputs * d_outputs)
            if model.losses:
                loss += tf.add_n(model.losses)
        # The loss is returned so that the forward output is computed, as in training.
        return loss, tape.gradient(loss, [inputs] + weights)

    def run():
        loss, _ = step(inputs, d_outputs)  # the gradients are dropped before the next step
        loss.numpy()

    # The capacity path's experts compute this many times a dense FFN's FLOPs at best.
    run.capacity_factor = (model.capacity_factor if config.num_experts is not None
                           and config.dispatch == "capacity" else None)
    return run


def measure(config: Config) -> dict:
    """Times `config` (and, for a MoE, the dense baseline alongside); runs in a worker."""
    allocator = loaded_allocator()
    if allocator != config.allocator:
        raise RuntimeError(f"the worker runs with the {allocator} allocator, "
                           f"not {config.allocator}")
    step = training_step(config)
    for _ in range(config.warmup):
        step()
    result = {"config": dataclasses.asdict(config), "peak_rss": peak_rss_bytes(),
              "capacity_factor": step.capacity_factor}
    steps = {"layer": step}
    if config.num_experts is not None:
        steps["dense"] = training_step(dataclasses.replace(config, num_experts=None))
        for _ in range(config.warmup):
            steps["dense"]()
    times = {name: [] for name in steps}
    cpu_times = {name: [] for name in steps}
    for _ in range(config.steps):
        for name, run in steps.items():
            start, cpu_start = time.perf_counter(), time.process_time()
            run()
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
    for key, values in (("times", times), ("cpu_times", cpu_times)):
        result[key] = values["layer"]
        result[f"dense_{key}"] = values.get("dense", values["layer"])
    return result


def run_worker(module: str, config: dict) -> dict:
    """Runs `python -m <module> --worker <config as JSON>`; returns the JSON it prints."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"),
               **allocator_environment(config.get("allocator", "tensorflow")))
    worker = subprocess.run([sys.executable, "-m", module, "--worker", json.dumps(config)],
                            env=env, capture_output=True, text=True, check=False)
    for line in reversed(worker.stdout.splitlines()):
        if line.startswith(_RESULT_PREFIX):
            return json.loads(line[len(_RESULT_PREFIX):])
    raise RuntimeError(f"worker {config} failed:\n{worker.stderr[-3000:]}")


def print_worker_result(result: dict) -> None:
    """What a worker prints for `run_worker` to read."""
    print(_RESULT_PREFIX + json.dumps(result), flush=True)


def _row(result: dict) -> list[str]:
    config = Config(**result["config"])
    times, dense = result["times"], result["dense_times"]
    median = statistics.median(times)
    dense_median = statistics.median(dense)
    cpu_ratio = (statistics.median(result["cpu_times"])
                 / statistics.median(result["dense_cpu_times"]))
    return [config.name, "-" if config.num_experts is None else config.dispatch,
            f"{1e3 * median:.0f}", f"{1e3 * min(times):.0f}", f"{1e3 * max(times):.0f}",
            f"{config.tokens / median:,.0f}", f"{config.useful_flops / median / 1e9:.0f}",
            f"{result['peak_rss'] / GIB:.2f}", f"{1e3 * dense_median:.0f}",
            f"{median / dense_median:.2f}", f"{min(times) / min(dense):.2f}",
            f"{cpu_ratio:.2f}"]


def format_table(results: list[dict]) -> str:
    """A Markdown table, one row per configuration."""
    header = ["layer", "dispatch", "median ms", "min ms", "max ms", "tokens/s", "GFLOP/s",
              "peak RSS GiB", "dense ms (same process)", "ratio vs dense",
              "min-time ratio", "CPU-time ratio"]
    rows = [header, ["---"] * len(header)] + [_row(result) for result in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    return "\n".join("| " + " | ".join(cell.ljust(width)
                                       for cell, width in zip(row, widths)) + " |"
                     for row in rows)


def ratio_line(results: list[dict], dispatch: str) -> str:
    """`ratio_vs_dense E8=<r> ...` for the configurations of one dispatch path."""
    chosen = [r for r in results if r["config"]["num_experts"] is not None
              and r["config"]["dispatch"] == dispatch]
    ratios = {r["config"]["num_experts"]: statistics.median(r["times"])
              / statistics.median(r["dense_times"]) for r in chosen}
    line = "ratio_vs_dense " + " ".join(f"E{e}={ratio:.2f}" for e, ratio in ratios.items())
    factors = {r["config"]["num_experts"]: r.get("capacity_factor") for r in chosen}
    if dispatch == "capacity" and all(factors.values()):
        # The capacity path's floor is capacity_factor x the dense FFN.
        line += "  per_capacity_factor " + " ".join(
            f"E{e}={ratio / factors[e]:.2f}" for e, ratio in ratios.items())
    return line


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1 (argparse turns the ValueError into a usage error)."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def positive_float(text: str) -> float:
    """An argparse type: a number > 0."""
    value = float(text)
    if not value > 0:
        raise ValueError(text)
    return value


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.layer_bench",
        description=__doc__.split("\n\n")[0],
        epilog="Without --quick, --dispatch defaults to both paths; with it, to sparse.")
    parser.add_argument("--quick", action="store_true",
                        help="only E = 8 and 64 (and, by default, only the sparse path); "
                             "no row of its own for the dense baseline")
    parser.add_argument("--dispatch", choices=("sparse", "capacity", "both"),
                        help="the MoE dispatch path(s) to run")
    parser.add_argument("--experts", type=positive_int, nargs="+",
                        help="numbers of experts (default 8 64 512; 8 64 with --quick)")
    parser.add_argument("--tokens", type=positive_int, default=Config.tokens,
                        help="tokens per step, T")
    parser.add_argument("--steps", type=positive_int, default=Config.steps,
                        help="timed steps per configuration, after the warm-up")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype (bfloat16: Keras's mixed_bfloat16 policy; the "
                             "gate stays float32)")
    parser.add_argument("--recompute-activations", action="store_true",
                        help="SparselyGatedMoE(recompute_activations=True)")
    parser.add_argument("--no-compiled-kernels", dest="compiled_kernels",
                        action="store_const", const=False, default="auto",
                        help="SparselyGatedMoE(compiled_kernels=False): TensorFlow ops only "
                             "(default: 'auto', the kernels where they apply)")
    parser.add_argument("--capacity-group-size", type=positive_int,
                        help="SparselyGatedMoE(capacity_group_size=...) for the capacity "
                             "path: route the tokens in groups of this many (default: "
                             "the whole batch as one group)")
    parser.add_argument("--capacity-factor", type=positive_float,
                        help="SparselyGatedMoE(capacity_factor=...) for the capacity path "
                             "(default: the layer's, 2.0); its experts compute "
                             "capacity_factor times a dense FFN's FLOPs at best")
    parser.add_argument("--jit-compile", action="store_true",
                        help="compile every step (the MoE layer's and the dense "
                             "baseline's) with XLA; the sparse path cannot compile")
    parser.add_argument("--allocator", choices=("tensorflow", "unpooled", "tcmalloc"),
                        default="tensorflow",
                        help="CPU memory allocator of the worker processes: TensorFlow's "
                             "pooling allocator, as moe_tf selects it (default); "
                             "every large tensor mapped afresh (unpooled: TensorFlow's "
                             "default where oneDNN is off); or tcmalloc for every tensor "
                             "(needs libtcmalloc-minimal4)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.experts and min(args.experts) < Config.k:
        parser.error(f"--experts: every layer needs at least k = {Config.k} experts; "
                     f"got {min(args.experts)}")
    if args.jit_compile and (args.dispatch or "sparse") != "capacity":
        parser.error("--jit-compile needs --dispatch capacity (the sparse dispatch has "
                     "dynamic shapes and a while loop, which XLA cannot compile)")
    if args.capacity_factor and args.dispatch == "sparse":
        parser.error("--capacity-factor applies to --dispatch capacity only")
    try:
        allocator_environment(args.allocator)
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv=None) -> None:
    args = _parse_args(argv)
    if args.worker:
        print_worker_result(measure(Config(**json.loads(args.worker))))
        return
    dispatch = args.dispatch or ("sparse" if args.quick else "both")
    paths = ("sparse", "capacity") if dispatch == "both" else (dispatch,)
    experts = args.experts or ([8, 64] if args.quick else [8, 64, 512])
    base = Config(tokens=args.tokens, steps=args.steps, dtype=args.dtype,
                  recompute_activations=args.recompute_activations,
                  compiled_kernels=args.compiled_kernels, allocator=args.allocator,
                  jit_compile=args.jit_compile)
    # --quick leaves out the dense baseline's own process (its row and peak RSS): every
    # MoE process times the dense baseline alongside anyway.
    configs = ([] if args.quick else [base]) + [
        dataclasses.replace(base, num_experts=e, dispatch=path,
                            **(dict(capacity_group_size=args.capacity_group_size,
                                    capacity_factor=args.capacity_factor)
                               if path == "capacity" else {}))
        for e in experts for path in paths]
    results = []
    for config in configs:
        path = "dense" if config.num_experts is None else config.dispatch
        print(f"running {config.name} ({path}) ...", file=sys.stderr, flush=True)
        results.append(run_worker("benchmarks.layer_bench", dataclasses.asdict(config)))
    print(f"T={args.tokens} d={base.model_dim} hidden={base.hidden_size} k={base.k} "
          f"dtype={args.dtype} recompute_activations={args.recompute_activations} "
          f"compiled_kernels={args.compiled_kernels} allocator={args.allocator} "
          f"capacity_group_size={args.capacity_group_size} "
          f"capacity_factor={args.capacity_factor} jit_compile={args.jit_compile} "
          f"steps={args.steps} (after {base.warmup} warm-up) "
          f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print(format_table(results))
    for path in paths[1:]:
        print(f"({path}) {ratio_line(results, path)}")
    print(ratio_line(results, paths[0]))


if __name__ == "__main__":
    main()
