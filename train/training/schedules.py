"""Learning-rate schedules of the paper."""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="moe_tf")
class WarmupInverseSqrt(keras.optimizers.schedules.LearningRateSchedule):
    """Rises linearly for `warmup_steps`, stays for `constant_steps`, then decays as
    1/sqrt(step) (continuous at the switch).

    The language models use 1000 warm-up steps and no constant phase; the translation
    models 2000 warm-up and 8000 constant steps (Appendices C and E).
    """

    def __init__(self, peak_learning_rate: float, *, warmup_steps: int,
                 constant_steps: int = 0):
        self.peak_learning_rate = peak_learning_rate
        self.warmup_steps = warmup_steps
        self.constant_steps = constant_steps

    def __call__(self, step):
        step = tf.cast(step, tf.float32) + 1.0  # the first update is step 1
        warmup = float(max(self.warmup_steps, 1))
        decay_start = warmup + self.constant_steps
        rise = step / warmup
        decay = tf.sqrt(decay_start / tf.maximum(step, decay_start))
        return self.peak_learning_rate * tf.minimum(rise, decay)

    def get_config(self):
        return {"peak_learning_rate": self.peak_learning_rate,
                "warmup_steps": self.warmup_steps, "constant_steps": self.constant_steps}
