"""Where the time of one layer_bench step goes, from the TensorFlow profiler.

    python -m benchmarks.profile_layer --experts 512        # the sparse MoE, E = 512
    python -m benchmarks.profile_layer                      # the dense baseline
    python -m benchmarks.profile_layer --experts 512 --dispatch capacity --capacity-factor 1

Builds the step of `benchmarks.layer_bench` (same layer, same loss), warms it up, records
`--steps` steps with `tf.profiler.experimental` and prints the time per step of every op
type and of the most expensive ops. Op times are summed over the executor's threads: ops
run concurrently (two inter-op threads, and the iterations of the experts' while loop
overlap), so the sums exceed the wall time. Profiling itself slows small ops down; compare
shares, not absolute times, with layer_bench.

With `--jit-compile` (the capacity dispatch, and the dense baseline) the step is one XLA
program, and the rows are its instructions as XLA named them (`MatMul.14` is the dot
compiled from a TensorFlow MatMul, `bitcast_multiply_fusion` a fusion); the type is the
name without its number.
"""

import argparse
import collections
import glob
import os
import re
import tempfile
import time

from benchmarks.layer_bench import Config, training_step

# A while loop's ops are named ".../while/body/_<n>/..." once per loop; the number differs
# between the forward and the gradient loops and carries no information.
_LOOP_BODY = re.compile(r"while/body/_\d+/")
# XLA numbers the instructions of one kind: "MatMul.14", "bitcast_multiply_fusion.2".
_INSTRUCTION_NUMBER = re.compile(r"\.\d+$")


def op_times(logdir: str) -> tuple[dict, dict, collections.Counter]:
    """Reads the host trace of a profile: (ps by op type, ps by op name, calls by type)."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    paths = glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb"))
    space = xplane_pb2.XSpace()
    with open(max(paths, key=os.path.getmtime), "rb") as f:
        space.ParseFromString(f.read())
    host = next(plane for plane in space.planes if plane.name == "/host:CPU")
    hlo_op = next((id_ for id_, stat in host.stat_metadata.items()
                   if stat.name == "hlo_op"), None)
    by_type, by_name = collections.Counter(), collections.Counter()
    calls = collections.Counter()
    for line in host.lines:
        for event in line.events:
            op_type, name = _op_of(host.event_metadata[event.metadata_id], event, hlo_op)
            if op_type:
                by_type[op_type] += event.duration_ps
                by_name[name] += event.duration_ps
                calls[op_type] += 1
    return by_type, by_name, calls


def _op_of(metadata, event, hlo_op_stat) -> tuple[str, str]:
    """(op type, op name) of a host-trace event that is an op's run, else ("", "")."""
    # TensorFlow op events are named "<op name>:<op type>", the type repeated as the
    # display name.
    op_type = metadata.display_name
    if op_type.startswith("__inference_"):  # a compiled step: its XLA instructions count
        return "", ""
    if op_type and metadata.name.endswith(":" + op_type):
        return op_type, _LOOP_BODY.sub("", metadata.name[:-len(op_type) - 1])
    # An XLA instruction's run carries the instruction's "hlo_op" statistic.
    if any(stat.metadata_id == hlo_op_stat for stat in event.stats):
        return _INSTRUCTION_NUMBER.sub("", metadata.name), metadata.name
    return "", ""


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_layer",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, help="number of experts; default: dense")
    parser.add_argument("--dispatch", choices=("sparse", "capacity"), default="sparse")
    parser.add_argument("--capacity-factor", type=float,
                        help="the capacity path's capacity_factor (default: the layer's)")
    parser.add_argument("--tokens", type=int, default=Config.tokens)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--recompute-activations", action="store_true")
    parser.add_argument("--jit-compile", action="store_true",
                        help="compile the step with XLA (the capacity dispatch or the "
                             "dense baseline; the sparse path cannot compile)")
    parser.add_argument("--steps", type=int, default=3, help="profiled steps")
    parser.add_argument("--top", type=int, default=25, help="rows per table")
    args = parser.parse_args(argv)
    if args.jit_compile and args.experts and args.dispatch != "capacity":
        parser.error("--jit-compile needs --dispatch capacity: the sparse path's shapes "
                     "depend on the routing, so XLA cannot compile it")

    import tensorflow as tf

    config = Config(num_experts=args.experts, dispatch=args.dispatch, tokens=args.tokens,
                    dtype=args.dtype, recompute_activations=args.recompute_activations,
                    capacity_factor=args.capacity_factor, jit_compile=args.jit_compile)
    step = training_step(config)
    for _ in range(config.warmup):
        step()
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        wall = time.perf_counter() - start
        tf.profiler.experimental.stop()
        by_type, by_name, calls = op_times(logdir)

    per_step = 1e-9 / args.steps  # ps -> ms per step
    total = sum(by_type.values())
    print(f"{config.name}, T={config.tokens}: wall {1e3 * wall / args.steps:.0f} ms/step, "
          f"op time {total * per_step:.0f} ms/step (summed over threads)")
    print("\n| op type | ms/step | share | calls/step |\n| --- | --- | --- | --- |")
    for op_type, ps in by_type.most_common(args.top):
        print(f"| {op_type} | {ps * per_step:.1f} | {ps / total:.1%} | "
              f"{calls[op_type] / args.steps:.0f} |")
    print("\n| op | ms/step | share |\n| --- | --- | --- |")
    for name, ps in by_name.most_common(args.top):
        print(f"| {name} | {ps * per_step:.1f} | {ps / total:.1%} |")


if __name__ == "__main__":
    main()
