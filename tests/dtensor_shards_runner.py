"""Places a small MoE language model on a batch:2,expert:2 DTensor mesh of 4 logical CPUs
and prints, as one JSON line, what every device holds of each weight and Adam slot.

Run in a process of its own (the CPU must be split before TensorFlow starts):
    python tests/dtensor_shards_runner.py
For each variable and device: the shard's shape, the experts it covers (from the device's
coordinate on the "expert" axis) and whether it equals that slice of the global value.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from train import distribution  # noqa: E402  (after the log level and the path are set)

NUM_EXPERTS = 8


def main():
    distribution.configure_cpu_devices(4)
    import keras
    import numpy as np

    from models.lm import LanguageModelConfig, build_language_model
    from moe_tf import MoEConfig

    placement = distribution.make_placement("dtensor", mesh="batch:2,expert:2")
    keras.utils.set_random_seed(0)
    model = build_language_model(LanguageModelConfig(
        vocab_size=50, model_dim=8,
        moe=MoEConfig(num_experts=NUM_EXPERTS, k=2, hidden_size=6, dispatch="capacity")))
    optimizer = keras.optimizers.Adam()
    placement.place(model, optimizer)

    mesh = placement.mesh
    locations = mesh.local_device_locations()        # [{axis: coordinate}] per device
    shards_of, global_shapes = {}, {}
    for variable in model.trainable_variables + optimizer.variables:
        value = placement.global_value(variable)
        sharded = placement.layout_of(variable).sharding_specs[:1] == ["expert"]
        per_device = value.shape[0] // mesh.dim_size("expert") if sharded else None
        shards = []
        for location, shard in zip(locations, placement.shards(variable)):
            shard = shard.numpy()
            if sharded:
                start = location["expert"] * per_device
                experts = [start, start + per_device]
                expected = value[start:start + per_device]
            else:
                experts, expected = None, value
            shards.append({"shape": list(shard.shape), "experts": experts,
                           "matches_global_slice": bool(np.array_equal(shard, expected))})
        shards_of[variable.path] = shards
        global_shapes[variable.path] = list(value.shape)
    print(json.dumps({"mesh": {axis: mesh.dim_size(axis) for axis in mesh.dim_names},
                      "variables": shards_of, "global_shapes": global_shapes}))
    sys.stdout.flush()
    # DTensor processes can hang at exit.
    os._exit(0)


if __name__ == "__main__":
    main()
