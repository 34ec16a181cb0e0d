"""The Sparsely-Gated Mixture-of-Experts layer (Shazeer et al., ICLR 2017)."""

from typing import Optional

import keras
import tensorflow as tf

from moe_tf import gating
from moe_tf.dispatch import capacity_dispatch, expert_capacity, sparse_dispatch
from moe_tf.expert_sharding import ExpertSharding
from moe_tf.experts import FeedForwardExperts
from moe_tf.gates import HierarchicalNoisyTopKGate, NoisyTopKGate, StrictlyBalancedGate
from moe_tf.metrics import ExpertLoadFraction

_DISPATCHES = ("sparse", "capacity")
_GATINGS = ("top_k", "balanced")
# GShard's training capacity factor; used when dispatch="capacity" gives none.
DEFAULT_CAPACITY_FACTOR = 2.0


@keras.saving.register_keras_serializable(package="moe_tf")
class SparselyGatedMoE(keras.layers.Layer):
    """y = sum_i G(x)_i E_i(x), applied to every position of `[..., input_dim]` inputs.

    Every position is routed on its own: all leading dimensions are flattened into one
    batch of tokens (the paper's "convolutional" application), so each expert sees the
    tokens of every sequence and time step of the batch.

    Args:
        num_experts: n, the number of experts.
        k: experts per token (per selected group when hierarchical).
        hidden_size: the ReLU hidden width of every expert.
        output_size: the output width; defaults to the input width.
        num_groups: a, for a hierarchical MoE of `num_groups` groups of
            `num_experts / num_groups` experts (Appendix B); None for a flat MoE.
        group_k: groups per token at the primary level; defaults to `k`.
        noisy_gating: add the trained Gaussian noise of Eq. 4 while training.
        importance_weight: w_importance, the weight of CV(Importance)^2.
        load_weight: w_load, the weight of CV(Load)^2.
        dispatch: "sparse" (dropless, sort-based) or "capacity" (fixed-capacity einsum).
        capacity_factor: slots per expert as a multiple of the even share,
            ceil(capacity_factor * tokens * assignments_per_token / experts); only with
            dispatch="capacity" (default 2.0).
        capacity_group_size: with dispatch="capacity", route the tokens in groups of
            this many (GShard's groups): each group has its own slots, computed as above
            with `tokens` = the group size, and the one-hot dispatch costs tokens x group
            size instead of tokens^2. None (the default): the whole batch is one group.
        gating: "top_k" (noisy top-k, flat or hierarchical) or "balanced" (the strictly
            balanced gating of Appendix F; `noisy_gating` does not apply to it).
        noise_epsilon: the floor added to the noise scale softplus(x W_noise).
        threshold_loss_weight: weight of the balanced gate's threshold loss.
        kernel_initializer, bias_initializer: for the experts (each expert is initialised
            as a lone Dense kernel would be).
        seed: seed of the gating noise.
        recompute_activations: recompute the experts' hidden activations on the backward
            pass instead of keeping them from the forward pass (Appendix D): less memory,
            one more matmul per assignment.
        compiled_kernels: in training calls of the sparse dispatch, run the experts and
            the per-token sums with the compiled CPU kernels of `moe_tf.kernels` when they
            are built and apply (float32, no visible GPU; for the experts also widths
            that are multiples of 16 and at most 2048 rows per expert on average);
            False keeps TensorFlow ops throughout.

    Call arguments:
        inputs: float `[..., input_dim]`, rank >= 2.
        training: noise, balancing losses and statistics only while training.
        mask: optional bool `inputs.shape[:-1]`; masked positions are not dispatched,
            output zeros and do not count in any balancing statistic.

    Returns:
        `[..., output_size]` in the layer's compute dtype.

    While training, the balancing loss is added with `add_loss` and the balance
    statistics are recorded in the layer's metrics (`balance_statistics()`).
    """

    def __init__(self, num_experts: int, k: int, hidden_size: int, *,
                 output_size: Optional[int] = None, num_groups: Optional[int] = None,
                 group_k: Optional[int] = None, noisy_gating: bool = True,
                 importance_weight: float = 0.1, load_weight: float = 0.1,
                 dispatch: str = "sparse", capacity_factor: Optional[float] = None,
                 capacity_group_size: Optional[int] = None, gating: str = "top_k",
                 noise_epsilon: float = gating.DEFAULT_NOISE_EPSILON,
                 threshold_loss_weight: float = 1.0,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 seed: Optional[int] = None, recompute_activations: bool = False,
                 compiled_kernels: bool = True, **kwargs):
        super().__init__(**kwargs)
        _check_arguments(num_experts=num_experts, k=k, hidden_size=hidden_size,
                         output_size=output_size, num_groups=num_groups, group_k=group_k,
                         importance_weight=importance_weight, load_weight=load_weight,
                         dispatch=dispatch, capacity_factor=capacity_factor,
                         capacity_group_size=capacity_group_size, gating=gating,
                         noise_epsilon=noise_epsilon)
        self.num_experts = num_experts
        self.k = k
        self.hidden_size = hidden_size
        self.output_size = output_size
        self.num_groups = num_groups
        self.group_k = group_k
        self.noisy_gating = noisy_gating
        self.importance_weight = importance_weight
        self.load_weight = load_weight
        self.dispatch = dispatch
        self.capacity_factor = capacity_factor
        self.capacity_group_size = capacity_group_size
        self.gating = gating
        self.noise_epsilon = noise_epsilon
        self.threshold_loss_weight = threshold_loss_weight
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.seed = seed
        self.recompute_activations = recompute_activations
        self.compiled_kernels = compiled_kernels
        self.supports_masking = True

        if gating == "balanced":
            self.gate = StrictlyBalancedGate(
                num_experts=num_experts, k=k, threshold_loss_weight=threshold_loss_weight,
                seed=seed, name="gate")
            self.assignments_per_token = k
        elif num_groups is None:
            self.gate = NoisyTopKGate(num_experts=num_experts, k=k,
                                      noisy_gating=noisy_gating,
                                      noise_epsilon=noise_epsilon, seed=seed, name="gate")
            self.assignments_per_token = k
        else:
            groups_k = k if group_k is None else group_k
            self.gate = HierarchicalNoisyTopKGate(
                num_groups=num_groups, experts_per_group=num_experts // num_groups,
                group_k=groups_k, k=k, noisy_gating=noisy_gating,
                noise_epsilon=noise_epsilon, seed=seed, name="gate")
            self.assignments_per_token = groups_k * k
        self.experts = None  # built once the input width is known
        self.expert_sharding = None  # runtime placement (see `shard_experts`)
        # The sparse path has dynamic shapes and a while loop: no XLA.
        self.supports_jit = dispatch == "capacity"

        self.cv_importance_metric = keras.metrics.Mean(name=f"{self.name}_cv_importance")
        self.cv_load_metric = keras.metrics.Mean(name=f"{self.name}_cv_load")
        self.max_mean_load_metric = keras.metrics.Mean(name=f"{self.name}_max_mean_load")
        self.load_fraction_metric = ExpertLoadFraction(
            num_experts, name=f"{self.name}_load_fraction")

    # Properties for the gate weights of the paper's notation.
    @property
    def w_gate(self):
        return self.gate.w_gate

    @property
    def w_noise(self):
        return self.gate.w_noise

    def build(self, input_shape):
        input_dim = input_shape[-1]
        if input_dim is None:
            raise ValueError(
                f"SparselyGatedMoE needs a known last dimension (input_dim); got input "
                f"shape {tuple(input_shape)}.")
        if len(input_shape) < 2:
            raise ValueError(
                f"SparselyGatedMoE needs inputs of rank >= 2 ([..., input_dim]); got "
                f"shape {tuple(input_shape)}.")
        self.gate.build((None, input_dim))
        self.experts = FeedForwardExperts(
            num_experts=self.num_experts, hidden_size=self.hidden_size,
            output_size=self.output_size or input_dim,
            kernel_initializer=self.kernel_initializer,
            bias_initializer=self.bias_initializer,
            recompute_activations=self.recompute_activations,
            compiled_kernels=self.compiled_kernels, dtype=self.dtype_policy,
            name="experts")
        self.experts.build((None, input_dim))

    def call(self, inputs, *, training=None, mask=None):
        tokens, token_mask = self._flatten(inputs, mask)
        gate_output = self.gate(tf.cast(tokens, tf.float32), training=training,
                                token_mask=token_mask)
        routing = gate_output.routing
        if self.dispatch == "sparse":
            outputs = sparse_dispatch(
                tokens, routing, self.experts,
                compiled_kernels=self.compiled_kernels and training is True)
        else:
            group_size = self.capacity_group_size or (
                tokens.shape[0] if tokens.shape[0] is not None else tf.shape(tokens)[0])
            capacity = expert_capacity(group_size, self.assignments_per_token,
                                       self.num_experts,
                                       self.capacity_factor or DEFAULT_CAPACITY_FACTOR)
            outputs = capacity_dispatch(tokens, routing, self.experts, capacity=capacity,
                                        group_size=self.capacity_group_size,
                                        expert_sharding=self.expert_sharding)
        if training:
            self._record_balance(gate_output)
        output_shape = tf.concat([tf.shape(inputs)[:-1], [self.experts.output_size]], 0)
        return tf.reshape(outputs, output_shape)

    def shard_experts(self, expert_sharding: Optional[ExpertSharding]) -> None:
        """Runs the layer with its experts split over a DTensor mesh, or (None) not.

        Only places the computation: the caller backs the weights with DVariables of
        `expert_sharding.weight_layout` and feeds batch-sharded inputs. Needs
        dispatch="capacity" (the sparse dispatch's sort and while loop have no DTensor
        layout propagation) and top-k gating (the balanced gate picks each expert's top
        tokens over the whole batch with a scatter that DTensor cannot shard), without
        `capacity_group_size` (its reshapes of batch-sharded tokens are not supported).
        """
        if expert_sharding is not None:
            if self.dispatch != "capacity":
                raise ValueError(
                    f"SparselyGatedMoE {self.name!r}: sharding the experts with DTensor "
                    f"needs dispatch='capacity'; the layer has dispatch={self.dispatch!r}.")
            if self.gating != "top_k":
                raise ValueError(
                    f"SparselyGatedMoE {self.name!r}: sharding the experts with DTensor "
                    f"needs gating='top_k'; the layer has gating={self.gating!r}.")
            if self.capacity_group_size is not None:
                raise ValueError(
                    f"SparselyGatedMoE {self.name!r}: sharding the experts with DTensor "
                    f"routes the batch as one group; the layer has capacity_group_size="
                    f"{self.capacity_group_size}.")
            if self.num_experts % expert_sharding.num_expert_shards:
                raise ValueError(
                    f"SparselyGatedMoE {self.name!r}: num_experts ({self.num_experts}) "
                    f"must be divisible by the mesh's expert axis "
                    f"({expert_sharding.num_expert_shards}).")
        self.expert_sharding = expert_sharding
        self.gate.batch_sharded = expert_sharding is not None

    def gate_values(self, inputs, training=False):
        """The dense gates G(x), float32 `[..., num_experts]`.

        For top-k gating each position has k non-zeros summing to 1 (group_k * k for a
        hierarchical layer). Records no loss and no statistic.
        """
        inputs = tf.convert_to_tensor(inputs)
        if not self.built:
            self.build(inputs.shape)
        tokens, _ = self._flatten(inputs, None)
        gates = self.gate(tf.cast(tokens, tf.float32), training=training)
        gates = gates.routing.dense_gates()
        return tf.reshape(gates, tf.concat([tf.shape(inputs)[:-1], [self.num_experts]], 0))

    def balance_statistics(self) -> dict:
        """Balance statistics averaged over the training calls since the last reset.

        Keys: `cv_importance`, `cv_load` (CV of the Load vector the loss uses: the smooth
        estimator with noisy gating, else token counts), `max_mean_load` (max over mean
        of the tokens each expert actually received) and `load_fraction` `[experts]`.
        """
        return {
            "cv_importance": self.cv_importance_metric.result(),
            "cv_load": self.cv_load_metric.result(),
            "max_mean_load": self.max_mean_load_metric.result(),
            "load_fraction": self.load_fraction_metric.result(),
        }

    def _record_balance(self, gate_output):
        """Adds the balancing loss and updates the balance metrics (training only).

        Under a tf.distribute strategy Importance, Load and the counts are summed over the
        replicas first, so every replica adds the loss of the global batch (the training
        loop divides the layers' losses by the replica count).
        """
        importance, load = gate_output.importance, gate_output.load
        counts = gate_output.routing.expert_counts()
        context = tf.distribute.get_replica_context()
        if context is not None and context.num_replicas_in_sync > 1:
            importance, load, counts = context.all_reduce(
                tf.distribute.ReduceOp.SUM, [importance, load, counts])
        if self.importance_weight or self.load_weight:
            self.add_loss(gating.balancing_loss(
                importance, load, importance_weight=self.importance_weight,
                load_weight=self.load_weight))
        self.cv_importance_metric.update_state(tf.sqrt(gating.cv_squared(importance)))
        self.cv_load_metric.update_state(tf.sqrt(gating.cv_squared(load)))
        self.max_mean_load_metric.update_state(
            tf.math.divide_no_nan(tf.reduce_max(counts), tf.reduce_mean(counts)))
        self.load_fraction_metric.update_state(counts)

    def _flatten(self, inputs, mask):
        """`[..., d]` inputs and `[...]` mask -> `[tokens, d]` and `[tokens]` (or None)."""
        if not inputs.dtype.is_floating:
            raise ValueError(
                f"SparselyGatedMoE expects floating-point inputs; got dtype "
                f"{inputs.dtype.name}.")
        input_dim = inputs.shape[-1]
        tokens = tf.reshape(inputs, [-1, input_dim])
        if mask is None:
            return tokens, None
        mask = tf.convert_to_tensor(mask)
        expected = inputs.shape[:-1]
        if mask.shape.rank is not None and expected.rank is not None and (
                mask.shape.rank != expected.rank
                or not mask.shape.is_compatible_with(expected)):
            raise ValueError(
                f"SparselyGatedMoE: `mask` must have shape inputs.shape[:-1] = "
                f"{expected.as_list()}; got {mask.shape.as_list()}.")
        return tokens, tf.reshape(tf.cast(mask, tf.bool), [-1])

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.output_size or input_shape[-1],)

    def compute_mask(self, inputs, mask=None):
        return mask

    def get_config(self):
        config = super().get_config()
        config.update(
            num_experts=self.num_experts, k=self.k, hidden_size=self.hidden_size,
            output_size=self.output_size, num_groups=self.num_groups,
            group_k=self.group_k, noisy_gating=self.noisy_gating,
            importance_weight=self.importance_weight, load_weight=self.load_weight,
            dispatch=self.dispatch, capacity_factor=self.capacity_factor,
            capacity_group_size=self.capacity_group_size, gating=self.gating,
            noise_epsilon=self.noise_epsilon,
            threshold_loss_weight=self.threshold_loss_weight,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
            seed=self.seed, recompute_activations=self.recompute_activations,
            compiled_kernels=self.compiled_kernels)
        return config


def _check_arguments(*, num_experts, k, hidden_size, output_size, num_groups, group_k,
                     importance_weight, load_weight, dispatch, capacity_factor,
                     capacity_group_size, gating, noise_epsilon):
    """Raises ValueError naming the first bad constructor argument."""

    def positive_int(name, value):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"SparselyGatedMoE: `{name}` must be a positive integer; "
                             f"got {value!r}.")

    positive_int("num_experts", num_experts)
    positive_int("k", k)
    positive_int("hidden_size", hidden_size)
    if output_size is not None:
        positive_int("output_size", output_size)
    if gating not in _GATINGS:
        raise ValueError(f"SparselyGatedMoE: `gating` must be one of {_GATINGS}; "
                         f"got {gating!r}.")
    if dispatch not in _DISPATCHES:
        raise ValueError(f"SparselyGatedMoE: `dispatch` must be one of {_DISPATCHES}; "
                         f"got {dispatch!r}.")
    for name, value in (("capacity_factor", capacity_factor),
                        ("capacity_group_size", capacity_group_size)):
        if value is not None and dispatch != "capacity":
            raise ValueError(f"SparselyGatedMoE: `{name}` only applies to "
                             "dispatch='capacity'; the sparse dispatch has no slots and "
                             "drops no token.")
    if capacity_factor is not None:
        if not capacity_factor > 0:
            raise ValueError(f"SparselyGatedMoE: `capacity_factor` must be > 0; got "
                             f"{capacity_factor!r}.")
    if capacity_group_size is not None:
        positive_int("capacity_group_size", capacity_group_size)
    for name, value in (("importance_weight", importance_weight),
                        ("load_weight", load_weight)):
        if not value >= 0:
            raise ValueError(f"SparselyGatedMoE: `{name}` must be >= 0; got {value!r}.")
    if not noise_epsilon > 0:
        raise ValueError(f"SparselyGatedMoE: `noise_epsilon` must be > 0 (it keeps the "
                         f"load estimator finite); got {noise_epsilon!r}.")
    if num_groups is None:
        if group_k is not None:
            raise ValueError("SparselyGatedMoE: `group_k` needs `num_groups` "
                             "(a hierarchical layer).")
        if k > num_experts:
            raise ValueError(f"SparselyGatedMoE: `k` ({k}) must be <= num_experts "
                             f"({num_experts}).")
        return
    if gating == "balanced":
        raise ValueError("SparselyGatedMoE: gating='balanced' is flat; it takes no "
                         "`num_groups`.")
    positive_int("num_groups", num_groups)
    if num_experts % num_groups:
        raise ValueError(f"SparselyGatedMoE: `num_experts` ({num_experts}) must be "
                         f"divisible by `num_groups` ({num_groups}).")
    experts_per_group = num_experts // num_groups
    if k > experts_per_group:
        raise ValueError(f"SparselyGatedMoE: `k` ({k}) must be <= the experts per group "
                         f"(num_experts / num_groups = {experts_per_group}).")
    if group_k is not None:
        positive_int("group_k", group_k)
        if group_k > num_groups:
            raise ValueError(f"SparselyGatedMoE: `group_k` ({group_k}) must be <= "
                             f"`num_groups` ({num_groups}).")
    elif k > num_groups:
        raise ValueError(f"SparselyGatedMoE: `group_k` defaults to k ({k}), which must "
                         f"be <= `num_groups` ({num_groups}); pass `group_k`.")
