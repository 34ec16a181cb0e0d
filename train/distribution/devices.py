"""Devices, strategies and meshes: what `--strategy`, `--mesh` and `--num_cpu_devices`
name, and which process is the chief."""

import json
import math
import os
from typing import Dict

import tensorflow as tf
from tensorflow.experimental import dtensor

STRATEGIES = ("default", "mirrored", "multi_worker", "dtensor")
MESH_AXES = ("batch", "expert")


def configure_cpu_devices(count: int) -> None:
    """Splits the CPU into `count` logical devices (before TensorFlow starts using it)."""
    if count <= 1:
        return
    (cpu,) = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)])


def parse_mesh(spec: str) -> Dict[str, int]:
    """`"batch:2,expert:2"` -> {"batch": 2, "expert": 2}; ValueError naming the problem."""
    sizes = {}
    for part in spec.split(","):
        name, _, size = part.strip().partition(":")
        if name not in MESH_AXES or not size.isdigit() or int(size) < 1 or name in sizes:
            raise ValueError(f"--mesh={spec!r}: expected 'batch:B,expert:E' with positive "
                             f"sizes (axes {MESH_AXES}, each once).")
        sizes[name] = int(size)
    return {axis: sizes.get(axis, 1) for axis in MESH_AXES}


def make_mesh(spec: str) -> dtensor.Mesh:
    """The DTensor mesh of `--mesh` over this job's accelerators (GPUs, else CPUs).

    With several clients (DTensor's DTENSOR_* environment variables, one process per
    host) the mesh spans the devices of all of them.
    """
    sizes = parse_mesh(spec)
    device_type = "GPU" if tf.config.list_physical_devices("GPU") else "CPU"
    dims = list(sizes.items())
    wanted = math.prod(sizes.values())
    if dtensor.num_clients() > 1:
        dtensor.initialize_accelerator_system(device_type)
        return dtensor.create_distributed_mesh(dims, device_type=device_type)
    devices = tf.config.list_logical_devices(device_type)
    if len(devices) != wanted:
        raise ValueError(
            f"--mesh={spec!r} needs {wanted} devices; this process has {len(devices)} "
            f"{device_type} device(s)"
            + (f" (on a CPU-only machine add --num_cpu_devices={wanted})"
               if device_type == "CPU" else "") + ".")
    return dtensor.create_mesh(dims, devices=[d.name for d in devices],
                               device_type=device_type)


def make_strategy(name: str) -> tf.distribute.Strategy:
    """The tf.distribute strategy of `--strategy=name` (any but dtensor)."""
    if name == "default":
        return tf.distribute.get_strategy()
    if name == "mirrored":
        devices = [d.name for d in tf.config.list_logical_devices("GPU")] or [
            d.name for d in tf.config.list_logical_devices("CPU")]
        return tf.distribute.MirroredStrategy(devices)
    if name == "multi_worker":
        if "TF_CONFIG" not in os.environ:
            raise ValueError("--strategy=multi_worker needs the TF_CONFIG environment "
                             "variable (cluster and task; see README).")
        return tf.distribute.MultiWorkerMirroredStrategy()
    raise ValueError(f"--strategy={name!r}: expected one of {STRATEGIES}.")


def is_chief(strategy: tf.distribute.Strategy) -> bool:
    """Whether this process writes checkpoints, summaries, metrics and exports."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return True
    if resolver.task_type == "chief":
        return True
    has_chief = "chief" in json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    return not has_chief and resolver.task_type == "worker" and resolver.task_id == 0
