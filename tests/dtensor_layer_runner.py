"""Runs SparselyGatedMoE layers with their experts split over DTensor meshes of 4 logical
CPUs and on one device, and prints, one JSON line per case, how far apart they are.

Run in a process of its own (the CPU must be split before TensorFlow starts):
    python tests/dtensor_layer_runner.py MESH/GATE[/CAPACITY_GROUP_SIZE] ...
with GATE `top_k`, `hierarchical` or `balanced`, e.g. `batch:2,expert:2/top_k/4`. Each case's layer:
8 experts, k=2, capacity dispatch with
capacity_factor 1 (some assignments are dropped), no noise. The one-device run routes the
same groups (capacity_group_size = the DTensor run's group size), so the two compute the
same function: the outputs, the layer's losses, the dropped fraction and the gradients of
every weight and of the inputs are compared.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train import distribution  # noqa: E402  (after the log level and the path are set)

ROWS, TIME, WIDTH = 8, 4, 6


def loss_and_gradients(model, inputs, weights):
    """The layer's outputs, a loss of them plus its losses, and that loss's gradients
    with respect to `weights` and the inputs."""
    import tensorflow as tf

    with tf.GradientTape() as tape:
        tape.watch(inputs)
        outputs = model(inputs, training=True)
        # Not a plain sum: every output element gets its own weight in the loss.
        scale = tf.reshape(tf.range(tf.size(outputs), dtype=tf.float32) % 7.0 - 3.0,
                           tf.shape(outputs))
        loss = tf.reduce_sum(outputs * scale) + tf.add_n(model.losses)
    gradients = tape.gradient(loss, weights + [inputs])
    return outputs, loss, gradients


def compare(mesh_spec, gate, group_size):
    import keras
    import numpy as np
    import tensorflow as tf

    from moe_tf import MoEConfig, SparselyGatedMoE

    placement = distribution.make_placement("dtensor", mesh=mesh_spec)
    sharding = placement.sharding
    devices = sharding.num_batch_shards * sharding.num_expert_shards
    share = ROWS * TIME // devices
    gate_settings = {"top_k": {"noisy_gating": False},
                     "hierarchical": {"noisy_gating": False, "num_groups": 2, "group_k": 1},
                     "balanced": {"gating": "balanced"}}[gate]
    config = MoEConfig(num_experts=8, k=2, hidden_size=5, dispatch="capacity",
                       capacity_factor=1.0, capacity_group_size=group_size,
                       **gate_settings)
    keras.utils.set_random_seed(1)
    inputs = keras.Input((TIME, WIDTH), batch_size=ROWS)
    layer = SparselyGatedMoE(config=config, name="moe")
    model = keras.Model(inputs, layer(inputs))
    # Gates away from zero so that the routing is not a tie.
    for weight in layer.gate.trainable_weights:
        weight.assign(np.random.default_rng(2).normal(size=weight.shape))
    x = tf.constant(np.random.default_rng(3).normal(size=(ROWS, TIME, WIDTH)), tf.float32)
    weights = model.trainable_variables

    reference = layer.__class__(config=config.replace(
        capacity_group_size=group_size or share), name="moe")
    reference_model = keras.Model(inputs, reference(inputs))
    reference_model.set_weights(model.get_weights())
    want = loss_and_gradients(reference_model, x, reference_model.trainable_variables)
    want_dropped = float(reference.balance_statistics()["dropped_fraction"])

    placement.place(model, keras.optimizers.SGD())
    x_placed = placement.to_dtensor(x, sharding.batch_sharded(3))
    got = tf.function(lambda x: loss_and_gradients(model, x, weights))(x_placed)
    got_dropped = float(placement.to_host(layer.dropped_fraction_metric.result()))

    def gap(a, b):
        return float(np.max(np.abs(np.asarray(a) - np.asarray(b)), initial=0.0))

    names = [weight.path for weight in weights] + ["inputs"]
    print(json.dumps({
        "mesh": mesh_spec, "gate": gate, "group_size": group_size or share,
        "outputs": gap(placement.to_host(got[0]), want[0]),
        "loss": gap(placement.to_host(got[1]), want[1]),
        "gradients": {name: gap(placement.to_host(g), w)
                      for name, g, w in zip(names, got[2], want[2])},
        "dropped_fraction": [got_dropped, want_dropped],
    }))
    sys.stdout.flush()


def main(cases):
    distribution.configure_cpu_devices(4)
    for case in cases:
        mesh_spec, gate, *group_size = case.split("/")
        compare(mesh_spec, gate, int(group_size[0]) if group_size else None)
    os._exit(0)  # DTensor processes can hang at exit


if __name__ == "__main__":
    main(sys.argv[1:])
