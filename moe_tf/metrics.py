"""Keras metrics for how evenly an MoE layer spreads its tokens."""

import keras
import tensorflow as tf


@keras.saving.register_keras_serializable(package="moe_tf")
class ExpertLoadFraction(keras.metrics.Metric):
    """The mean share of the batch's assignments that went to each expert, `[experts]`."""

    def __init__(self, num_experts: int, *, name: str = "load_fraction", **kwargs):
        super().__init__(name=name, **kwargs)
        self.num_experts = num_experts
        self.total = self.add_variable(shape=(num_experts,), initializer="zeros",
                                       name="total")
        self.count = self.add_variable(shape=(), initializer="zeros", name="count")

    def update_state(self, expert_counts):
        """expert_counts: `[experts]`, tokens each expert received in one batch."""
        expert_counts = tf.cast(expert_counts, self.dtype)
        self.total.assign_add(tf.math.divide_no_nan(expert_counts,
                                                    tf.reduce_sum(expert_counts)))
        self.count.assign_add(1.0)

    def result(self):
        return tf.math.divide_no_nan(tf.convert_to_tensor(self.total),
                                     tf.convert_to_tensor(self.count))

    def get_config(self):
        return {**super().get_config(), "num_experts": self.num_experts}
