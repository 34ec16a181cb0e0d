"""The `--strategy` choices and the pieces the training loop needs from them.

- `default`: one device.
- `mirrored`: `tf.distribute.MirroredStrategy` over the local devices (data parallel).
- `multi_worker`: `tf.distribute.MultiWorkerMirroredStrategy`, configured by `TF_CONFIG`.

Every strategy sees the same sequence of global batches: each global batch is cut into one
slice per replica (padded with empty rows to an equal size), and each input pipeline keeps
the slices of its own replicas. A run therefore follows the same trajectory whatever the
number of replicas, up to floating-point summation order.
"""

import json
import os

import tensorflow as tf

STRATEGIES = ("default", "mirrored", "multi_worker")


def configure_cpu_devices(count: int) -> None:
    """Splits the CPU into `count` logical devices (before TensorFlow starts using it)."""
    if count <= 1:
        return
    (cpu,) = tf.config.list_physical_devices("CPU")
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(count)])


def make_strategy(name: str) -> tf.distribute.Strategy:
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


def local_replica_slices(dataset: tf.data.Dataset, strategy: tf.distribute.Strategy
                         ) -> tf.data.Dataset:
    """Global batches `[batch, ...]` -> this process's replica slices `[local, slice, ...]`.

    Each global batch is padded with all-zero rows (id 0 is padding) to a multiple of the
    replica count and cut into equal slices; this process keeps the slices of its own
    replicas. The result is an ordinary tf.data pipeline, so its iterator checkpoints.
    """
    replicas = strategy.num_replicas_in_sync
    local = _local_replicas(strategy)
    first = _first_local_replica(strategy)

    def slices(*tensors):
        size = tf.shape(tensors[0])[0]
        per_replica = (size + replicas - 1) // replicas

        def cut(tensor):
            padding = [[0, per_replica * replicas - size]] + [[0, 0]] * (tensor.shape.rank - 1)
            pieces = tf.reshape(tf.pad(tensor, padding),
                                tf.concat([[replicas, per_replica], tf.shape(tensor)[1:]], 0))
            return pieces[first:first + local]

        cuts = tuple(cut(tensor) for tensor in tensors)
        return cuts if len(cuts) > 1 else cuts[0]

    return dataset.map(slices)


def _local_replicas(strategy: tf.distribute.Strategy) -> int:
    if strategy.num_replicas_in_sync == 1:
        return 1  # also the default strategy, which has no device list
    return len(strategy.extended.worker_devices)


def _first_local_replica(strategy: tf.distribute.Strategy) -> int:
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return 0
    workers = json.loads(os.environ["TF_CONFIG"])["cluster"]
    # Replicas are numbered chief first, then workers by task id.
    order = [("chief", i) for i in range(len(workers.get("chief", [])))] + [
        ("worker", i) for i in range(len(workers.get("worker", [])))]
    return order.index((resolver.task_type, resolver.task_id)) * _local_replicas(strategy)


def to_replicas(strategy: tf.distribute.Strategy, local_slices):
    """`[local, slice, ...]` tensors (or tuples of them) -> per-replica values."""
    first = _first_local_replica(strategy)

    def value(context):
        index = context.replica_id_in_sync_group - first
        return tf.nest.map_structure(lambda tensor: tensor[index], local_slices)

    return strategy.experimental_distribute_values_from_function(value)
