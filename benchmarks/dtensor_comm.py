"""What one DTensor training step of an MoE layer sends between devices.

    python -m benchmarks.dtensor_comm                               # batch:2,expert:2
    python -m benchmarks.dtensor_comm --mesh batch:1,expert:4 --json comm.json

Places one `SparselyGatedMoE` (capacity dispatch) on a mesh of logical CPUs, traces one
training step (forward, backward, the gradients relaid out to their weights' layouts)
and reads the programs DTensor runs on each device (TensorFlow's graph dumps,
`TF_DUMP_GRAPH_PREFIX`). It lists every collective op of that program: the DTensor
operation it lowers (all-to-all, all-gather, all-reduce...), the TensorFlow collective,
its shape and group size, and the bytes the device sends for it by that collective's
usual algorithm (all-to-all and all-gather (n - 1) / n of the tensor, ring all-reduce
2 (n - 1) / n). The dispatch's ideal, GShard's all-to-all, moves each way
tokens per device x k x capacity_factor x d x 4 bytes x (expert shards - 1) / expert
shards; the report sets the measured bytes against it.
"""

import argparse
import glob
import json
import os
import re
import shutil
import sys
import tempfile

_STEP_NAME = "moe_training_step"
_BYTES = {"DT_FLOAT": 4, "DT_BFLOAT16": 2, "DT_HALF": 2, "DT_INT32": 4, "DT_INT64": 8}
# Bytes a device sends for a tensor of S bytes in a group of n, by the usual algorithm.
_SENT = {"CollectiveAllToAllV2": lambda size, n: size * (n - 1) / n,
         "CollectiveGatherV2": lambda size, n: size * (n - 1) / n,
         "CollectiveReduceV2": lambda size, n: 2 * size * (n - 1) / n,
         "CollectiveReduceScatterV2": lambda size, n: size * (n - 1)}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mesh", default="batch:2,expert:2")
    parser.add_argument("--tokens", type=int, default=1024, help="tokens per step")
    parser.add_argument("--model_dim", type=int, default=64)
    parser.add_argument("--hidden_size", type=int, default=128)
    parser.add_argument("--num_experts", type=int, default=16)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--capacity_factor", type=float, default=1.25)
    parser.add_argument("--json", help="also write the report to this file")
    return parser.parse_args(argv)


def traced_step_collectives(args, dump_dir):
    """Builds, places and runs one training step; returns the collective ops of the
    program each device runs, each a dict, and the `ExpertSharding`."""
    from train import distribution

    mesh_axes = distribution.devices.parse_mesh(args.mesh)
    num_devices = 1
    for size in mesh_axes.values():
        num_devices *= size
    distribution.configure_cpu_devices(num_devices)
    import keras
    import numpy as np
    import tensorflow as tf
    from tensorflow.experimental import dtensor

    from moe_tf import MoEConfig, SparselyGatedMoE

    placement = distribution.make_placement("dtensor", mesh=args.mesh)
    layer = SparselyGatedMoE(config=MoEConfig(
        num_experts=args.num_experts, k=args.k, hidden_size=args.hidden_size,
        dispatch="capacity", capacity_factor=args.capacity_factor), name="moe")
    inputs = keras.Input((args.model_dim,), batch_size=args.tokens)
    model = keras.Model(inputs, layer(inputs))
    placement.place(model, keras.optimizers.SGD())
    weights = model.trainable_variables
    layouts = [placement.sharding.weight_layout(weight) for weight in weights]

    def moe_training_step(tokens):
        with tf.GradientTape() as tape:
            tape.watch(tokens)  # as if the layers before the MoE were trained too
            loss = tf.reduce_sum(model(tokens, training=True) ** 2) + tf.add_n(model.losses)
        gradients = tape.gradient(loss, weights + [tokens])
        return [dtensor.relayout(g, layout)
                for g, layout in zip(gradients, layouts)] + gradients[-1:]

    tokens = np.random.default_rng(0).normal(size=(args.tokens, args.model_dim))
    tokens = placement.to_dtensor(tf.constant(tokens, tf.float32),
                                   placement.sharding.batch_sharded(2))
    tf.function(moe_training_step)(tokens)
    return _collectives_of(_device_program(dump_dir)), placement.sharding


def _device_program(dump_dir):
    """The step's program as DTensor expanded it (the one program every device runs on
    its shards), as a GraphDef."""
    from google.protobuf import text_format
    from tensorflow.core.framework import graph_pb2

    dumps = sorted(path for path in glob.glob(
        os.path.join(dump_dir, f"*{_STEP_NAME}*.main.initial.pbtxt"))
        if "_partition_" not in path)
    if not dumps:
        raise RuntimeError(f"dtensor_comm: no graph dump of the step in {dump_dir}.")
    graph = graph_pb2.GraphDef()
    with open(dumps[-1]) as file:
        text_format.Parse(file.read(), graph)
    return graph


def _collectives_of(graph):
    # DTensor puts the expanded program in a function of the graph's library.
    all_nodes = list(graph.node) + [node for function in graph.library.function
                                    for node in function.node_def]
    nodes = {node.name: node for node in all_nodes}
    found = []
    for node in all_nodes:
        if node.op not in _SENT:
            continue
        shape = [dim.size for dim in node.attr["_output_shapes"].list.shape[0].dim]
        group_size = nodes[node.input[1].split(":")[0]].attr["value"].tensor.int_val[0]
        dtype = _BYTES[tf_dtype_name(node.attr["T"].type)]
        size = dtype
        for dim in shape:
            size *= dim
        kind = re.search(r"DTensor(\w+?)Op", node.name)
        found.append({"dtensor_op": kind.group(1) if kind else "?", "op": node.op,
                      "at": node.name.split("/")[-2], "shape": shape,
                      "group_size": group_size,
                      "bytes_sent": _SENT[node.op](size, group_size)})
    return found


def tf_dtype_name(enum_value) -> str:
    from tensorflow.core.framework import types_pb2
    return types_pb2.DataType.Name(enum_value)


def report(args, collectives, sharding):
    batch_shards, expert_shards = sharding.num_batch_shards, sharding.num_expert_shards
    tokens_per_device = args.tokens // (batch_shards * expert_shards)
    ideal = (tokens_per_device * args.k * args.capacity_factor * args.model_dim * 4
             * (expert_shards - 1) / expert_shards)
    all_to_all = sum(c["bytes_sent"] for c in collectives if c["dtensor_op"] == "AllToAll")
    return {"mesh": args.mesh, "tokens": args.tokens, "model_dim": args.model_dim,
            "num_experts": args.num_experts, "k": args.k,
            "capacity_factor": args.capacity_factor, "collectives": collectives,
            "all_to_all_bytes_sent": all_to_all,
            "total_bytes_sent": sum(c["bytes_sent"] for c in collectives),
            # Forward and backward: each moves the buffers there and back.
            "ideal_all_to_all_bytes": 4 * ideal}


def main(argv=None):
    args = parse_args(argv)
    dump_dir = tempfile.mkdtemp(prefix="dtensor_comm_")
    os.environ["TF_DUMP_GRAPH_PREFIX"] = dump_dir
    os.environ["TF_DUMP_GRAPH_NAME_FILTER"] = "*"  # unset, nothing is dumped
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        collectives, sharding = traced_step_collectives(args, dump_dir)
    finally:
        shutil.rmtree(dump_dir, ignore_errors=True)  # tens of MB of graph dumps
    result = report(args, collectives, sharding)
    print(f"mesh {args.mesh}: {args.tokens} tokens of d={args.model_dim}, "
          f"E={args.num_experts}, k={args.k}, capacity_factor={args.capacity_factor}")
    print(f"{'DTensor op':<14}{'lowered to':<28}{'at':<26}{'shape':<24}{'n':>3}"
          f"{'bytes sent':>14}")
    for c in collectives:
        print(f"{c['dtensor_op']:<14}{c['op']:<28}{c['at'][:25]:<26}{str(c['shape']):<24}"
              f"{c['group_size']:>3}{c['bytes_sent']:>14,.0f}")
    print(f"all-to-all bytes sent per device per step: {result['all_to_all_bytes_sent']:,.0f}"
          f" (ideal, 2 ways x forward and backward: {result['ideal_all_to_all_bytes']:,.0f})")
    print(f"all collectives: {result['total_bytes_sent']:,.0f} bytes per device per step")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(result, file, indent=1)
    sys.stdout.flush()
    os._exit(0)  # DTensor processes can hang at exit


if __name__ == "__main__":
    main()
