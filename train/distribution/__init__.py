"""The `--strategy` choices: how the one training loop places a model on devices.

- `default`: one device.
- `mirrored`: `tf.distribute.MirroredStrategy` over the local devices (data parallel).
- `multi_worker`: `tf.distribute.MultiWorkerMirroredStrategy`, configured by `TF_CONFIG`.
- `dtensor`: a DTensor mesh such as `batch:2,expert:2`: the batch split over "batch",
  every weight replicated except the experts, which are split over "expert" (the paper's
  mix of data and model parallelism; see `moe_tf.expert_sharding`).

`make_placement` returns a `DataParallel` (the first three) or an `ExpertParallel`
(dtensor); both implement the `Placement` protocol the training loop talks to, and both
differentiate `differentiated_loss` (the one place that says how the NLL and the layers'
auxiliary losses are scaled per replica).

Every strategy sees the same sequence of global batches: each global batch is cut into one
slice per replica (padded with empty rows to an equal size), and each input pipeline keeps
the slices of its own replicas. A run therefore follows the same trajectory whatever the
placement, up to floating-point summation order, and its checkpoints (model, optimizer,
data position) restore under any other placement.

Modules: `devices` (strategies, meshes, the chief), `replica_data` (global batches ->
replica slices), `placement` (the `Placement` protocol and `differentiated_loss`),
`data_parallel` and `expert_parallel` (the two placements).
"""

from typing import Optional

from train.distribution.data_parallel import DataParallel
from train.distribution.devices import (MESH_AXES, STRATEGIES, configure_cpu_devices,
                                        is_chief, make_mesh, make_strategy, parse_mesh)
from train.distribution.expert_parallel import DTENSOR_LENGTH_MULTIPLE, ExpertParallel
from train.distribution.placement import Placement, differentiated_loss
from train.distribution.replica_data import local_replica_slices, to_replicas

__all__ = [
    "DTENSOR_LENGTH_MULTIPLE", "DataParallel", "ExpertParallel", "MESH_AXES", "Placement",
    "STRATEGIES", "configure_cpu_devices", "differentiated_loss", "is_chief",
    "local_replica_slices", "make_mesh", "make_placement", "make_strategy", "parse_mesh",
    "to_replicas",
]


def make_placement(name: str, *, mesh: Optional[str] = None,
                   jit_compile: bool = False) -> Placement:
    """The placement of `--strategy=name` (and `--mesh` for dtensor); `jit_compile`
    (default strategy only) compiles its steps with XLA."""
    if jit_compile and name != "default":
        raise ValueError(f"--jit_compile needs --strategy=default (got --strategy={name}).")
    if name == "dtensor":
        if not mesh:
            raise ValueError("--strategy=dtensor needs --mesh, e.g. batch:2,expert:2.")
        return ExpertParallel(make_mesh(mesh))
    if mesh:
        raise ValueError(f"--mesh applies to --strategy=dtensor only (got "
                         f"--strategy={name}).")
    return DataParallel(make_strategy(name), name=name, jit_compile=jit_compile)
