"""Optimizers for very large mixtures of experts (Appendix D of the paper)."""

import keras
import tensorflow as tf
from keras import ops


@keras.saving.register_keras_serializable(package="moe_tf")
class FactoredAdam(keras.optimizers.Optimizer):
    """Adam without a first moment and with a factored second moment (Appendix D).

    The paper trains the expert weights of its largest models with this variant of Adam
    to fit them in memory: beta_1 = 0, so there is no first-moment slot, and the second
    moment of a matrix is kept only as its row and column means, re-formed at each step as
    their outer product divided by their mean. Variables of rank >= 2 are factored over
    their last two axes: a stacked `[experts, rows, cols]` kernel per expert (its slots
    are `[experts, rows]` and `[experts, cols]` instead of Adam's two
    `[experts, rows, cols]`), an `[experts, hidden]` bias stack as one matrix. Variables
    of rank < 2 keep a full second moment.

    For the gradient g of a `[..., rows, cols]` variable w, at step t:

        R_t = beta_2 R_{t-1} + (1 - beta_2) mean over cols of g^2     `[..., rows]`
        C_t = beta_2 C_{t-1} + (1 - beta_2) mean over rows of g^2     `[..., cols]`
        V_t = R_t C_t^T / mean(R_t)                                    `[..., rows, cols]`
        w_t = w_{t-1} - learning_rate sqrt(1 - beta_2^t) g / (sqrt(V_t) + epsilon)

    (an unfactored variable has V_t = beta_2 V_{t-1} + (1 - beta_2) g^2). Adam's bias
    correction applies unchanged: R, C and so V all carry the factor 1 - beta_2^t. A
    matrix that has only had zero gradients (an expert no token has reached) has V = 0 and
    does not move.

    Meant for the experts' weights while the rest of the model uses Adam, e.g. in a
    custom training step:

        experts = moe.experts.trainable_weights
        others = [w for w in model.trainable_weights if all(w is not e for e in experts)]
        grads = tape.gradient(loss, experts + others)
        factored.apply_gradients(zip(grads[:len(experts)], experts))
        adam.apply_gradients(zip(grads[len(experts):], others))

    Args:
        learning_rate: a float, a `LearningRateSchedule` or a callable.
        beta_2: decay rate of the second-moment estimates.
        epsilon: added to sqrt(V) ("epsilon hat" of Adam).
        **kwargs: the base optimizer's arguments (`weight_decay`, `clipnorm`, ...).
    """

    def __init__(self, learning_rate=0.001, beta_2: float = 0.999, epsilon: float = 1e-7,
                 name: str = "factored_adam", **kwargs):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        self.beta_2 = beta_2
        self.epsilon = epsilon

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self._previous_update = []  # see update_step
        # One entry per variable, None where a slot does not apply: factored variables
        # have row and column moments, the others a full velocity.
        self._row_moments, self._column_moments, self._velocities = [], [], []
        for variable in var_list:
            shape = tuple(variable.shape)
            name = variable.path.replace("/", "_")
            if len(shape) >= 2:
                self._row_moments.append(self.add_variable(
                    shape=shape[:-1], dtype=variable.dtype, name=f"{name}_row_moment"))
                self._column_moments.append(self.add_variable(
                    shape=shape[:-2] + shape[-1:], dtype=variable.dtype,
                    name=f"{name}_column_moment"))
                self._velocities.append(None)
            else:
                self._row_moments.append(None)
                self._column_moments.append(None)
                self._velocities.append(self.add_variable_from_reference(variable,
                                                                         "velocity"))

    def apply(self, grads, trainable_variables=None):
        self._previous_update = []  # see update_step
        return super().apply(grads, trainable_variables)

    def update_step(self, gradient, variable, learning_rate):
        dtype = variable.dtype
        gradient = ops.cast(gradient, dtype)
        beta_2 = ops.cast(self.beta_2, dtype)
        step = ops.cast(self.iterations + 1, dtype)
        alpha = ops.cast(learning_rate, dtype) * ops.sqrt(1 - ops.power(beta_2, step))
        index = self._get_variable_index(variable)
        rows = self._row_moments[index]
        if rows is None:
            velocity = self._velocities[index]
            self.assign_add(velocity, (ops.square(gradient) - velocity) * (1 - beta_2))
            self.assign_sub(variable,
                            gradient * (alpha / (ops.sqrt(velocity) + self.epsilon)))
            return
        # The factored variables are updated one after another: each update has
        # full-size temporaries (g^2, then the denominator: 2 GiB each per kernel at 4096
        # experts of 512 x 256), and concurrent updates would hold them all at once.
        with tf.control_dependencies(self._previous_update):
            columns = self._column_moments[index]
            squared = ops.square(gradient)
            self.assign_add(rows, (ops.mean(squared, axis=-1) - rows) * (1 - beta_2))
            self.assign_add(columns, (ops.mean(squared, axis=-2) - columns) * (1 - beta_2))
            # sqrt(R C^T / mean(R)) = sqrt(R / mean(R)) sqrt(C)^T; the divisions reuse
            # the denominator's buffer.
            row_scale = ops.sqrt(ops.divide_no_nan(
                rows, ops.mean(rows, axis=-1, keepdims=True)))
            denominator = (ops.expand_dims(row_scale, -1)
                           * ops.expand_dims(ops.sqrt(columns), -2) + self.epsilon)
            self.assign_sub(variable, gradient * (alpha / denominator))
        # A read of the updated variable: ordered after the update, and what the next
        # factored update waits for.
        self._previous_update = [tf.convert_to_tensor(variable)]

    def get_config(self):
        config = super().get_config()
        config.update(beta_2=self.beta_2, epsilon=self.epsilon)
        return config
