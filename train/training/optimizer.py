"""The training binaries' optimizers, with the paper's learning-rate schedule."""

import keras

from moe_tf.optimizers import FactoredAdam
from train.training.schedules import WarmupInverseSqrt

# --optimizer: Adam, or Adam without first moment and with a factored second moment
# (Appendix D).
OPTIMIZERS = {"adam": keras.optimizers.Adam, "factored_adam": FactoredAdam}


def make_optimizer(name: str, *, learning_rate: float, warmup_steps: int,
                   constant_steps: int = 0,
                   clip_norm: float = 0.0) -> keras.optimizers.Optimizer:
    """The optimizer `name` (of OPTIMIZERS) with the paper's schedule: linear warm-up to
    `learning_rate`, `constant_steps` at the peak, then 1/sqrt(step) decay; gradients
    clipped to the global norm `clip_norm` (0: not clipped)."""
    schedule = WarmupInverseSqrt(learning_rate, warmup_steps=warmup_steps,
                                 constant_steps=constant_steps)
    return OPTIMIZERS[name](learning_rate=schedule, global_clipnorm=clip_norm or None)
