"""Cutting global batches into replica slices, the same under every placement.

Each global batch is padded with empty (all-zero) rows to a multiple of the replica count
and cut into one equal slice per replica; each input pipeline keeps the slices of its own
replicas, and `to_replicas` hands them to a tf.distribute strategy's replicas.
"""

import json
import os

import tensorflow as tf


def local_replica_slices(dataset: tf.data.Dataset, strategy: tf.distribute.Strategy
                         ) -> tf.data.Dataset:
    """Global batches `[batch, ...]` -> this process's replica slices `[local, slice, ...]`.

    Each global batch is padded with all-zero rows (id 0 is padding) to a multiple of the
    replica count and cut into equal slices; this process keeps the slices of its own
    replicas. The result is an ordinary tf.data pipeline, so its iterator checkpoints.
    """
    replicas = strategy.num_replicas_in_sync
    local = local_replica_count(strategy)
    first = first_local_replica(strategy)

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


def local_replica_count(strategy: tf.distribute.Strategy) -> int:
    """How many of the strategy's replicas run in this process."""
    if strategy.num_replicas_in_sync == 1:
        return 1  # also the default strategy, which has no device list
    return len(strategy.extended.worker_devices)


def first_local_replica(strategy: tf.distribute.Strategy) -> int:
    """The global index of this process's first replica."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return 0
    workers = json.loads(os.environ["TF_CONFIG"])["cluster"]
    # Replicas are numbered chief first, then workers by task id.
    order = [("chief", i) for i in range(len(workers.get("chief", [])))] + [
        ("worker", i) for i in range(len(workers.get("worker", [])))]
    return order.index((resolver.task_type, resolver.task_id)) * local_replica_count(strategy)


def to_replicas(strategy: tf.distribute.Strategy, local_slices):
    """`[local, slice, ...]` tensors (or tuples of them) -> per-replica values."""
    first = first_local_replica(strategy)

    def value(context):
        index = context.replica_id_in_sync_group - first
        return tf.nest.map_structure(lambda tensor: tensor[index], local_slices)

    return strategy.experimental_distribute_values_from_function(value)
