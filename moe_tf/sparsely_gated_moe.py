"""The Sparsely-Gated Mixture-of-Experts layer (Shazeer et al., ICLR 2017)."""

import dataclasses
from typing import Optional, Union

import keras
import tensorflow as tf

from moe_tf import kernels
from moe_tf.config import MoEConfig
from moe_tf.dispatch import capacity_dispatch, expert_capacity, sparse_dispatch
from moe_tf.expert_sharding import ExpertSharding
from moe_tf.experts import FeedForwardExperts
from moe_tf.gates import GATES
from moe_tf.gating import balancing_loss, cv_squared
from moe_tf.metrics import ExpertLoadFraction

_CONFIG_FIELDS = tuple(field.name for field in dataclasses.fields(MoEConfig))


@keras.saving.register_keras_serializable(package="moe_tf")
class SparselyGatedMoE(keras.layers.Layer):
    """y = sum_i G(x)_i E_i(x), applied to every position of `[..., input_dim]` inputs.

    Every position is routed on its own: all leading dimensions are flattened into one
    batch of tokens (the paper's "convolutional" application), so each expert sees the
    tokens of every sequence and time step of the batch.

    The MoE settings come as one `MoEConfig` (`config=`) or as keyword arguments of the
    same names (`SparselyGatedMoE(32, 4, 256, gating="balanced")`), not both; a keyword
    left at None takes MoEConfig's default. See `MoEConfig` for each setting: num_experts,
    k, hidden_size, num_groups, group_k, gating, noisy_gating, noise_epsilon,
    bias_update_rate, threshold_loss_weight, switch_loss_weight, top_p_threshold,
    normalize_top_k, router_bias, router_z_loss_weight, importance_weight, load_weight,
    dispatch, capacity_factor, capacity_group_size, recompute_activations,
    compiled_kernels, expert_activation, gated_experts, expert_bias.

    Args (beyond the MoE settings):
        output_size: the output width; defaults to the input width.
        kernel_initializer, bias_initializer: for the experts (each expert is initialised
            as a lone Dense kernel would be).
        expert_kernel_storage: how the experts' kernels are stored: "float32", or for
            inference "bfloat16" or "int8" (see `FeedForwardExperts` and
            `quantize_experts`).
        seed: seed of the gating noise.

    Call arguments:
        inputs: float `[..., input_dim]`, rank >= 2.
        training: noise, balancing losses and statistics only while training.
        mask: optional bool `inputs.shape[:-1]`; masked positions are not dispatched,
            output zeros and do not count in any balancing statistic.

    Returns:
        `[..., output_size]` in the layer's compute dtype.

    While training, the balancing losses (the paper's, and the gate's own) are added with
    `add_loss`, the balance statistics are recorded in the layer's metrics
    (`balance_statistics()`), and a gate that balances by state (the aux-loss-free bias)
    updates it from the batch's loads.

    Under a tf.distribute strategy the balancing loss is that of the global batch:
    Importance and Load are summed over the replicas before their CV is taken, so every
    replica adds the same value. Like a Keras regularization loss it must therefore be
    scaled by 1 / replicas before the replicas' gradients are summed
    (`tf.nn.scale_regularization_loss`, which is what `train`'s steps do for every
    placement; a DTensor step is one replica over the global batch).
    """

    def __init__(self, num_experts: Optional[int] = None, k: Optional[int] = None,
                 hidden_size: Optional[int] = None, *,
                 config: Optional[MoEConfig] = None, output_size: Optional[int] = None,
                 num_groups: Optional[int] = None, group_k: Optional[int] = None,
                 gating: Optional[str] = None, noisy_gating: Optional[bool] = None,
                 noise_epsilon: Optional[float] = None,
                 bias_update_rate: Optional[float] = None,
                 threshold_loss_weight: Optional[float] = None,
                 switch_loss_weight: Optional[float] = None,
                 top_p_threshold: Optional[float] = None,
                 normalize_top_k: Optional[bool] = None, router_bias: Optional[bool] = None,
                 router_z_loss_weight: Optional[float] = None,
                 importance_weight: Optional[float] = None,
                 load_weight: Optional[float] = None, dispatch: Optional[str] = None,
                 capacity_factor: Optional[float] = None,
                 capacity_group_size: Optional[int] = None,
                 recompute_activations: Optional[bool] = None,
                 compiled_kernels: Union[str, bool, None] = None,
                 expert_activation: Optional[str] = None,
                 gated_experts: Optional[str] = None, expert_bias: Optional[bool] = None,
                 kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 expert_kernel_storage: str = "float32",
                 seed: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        settings = {name: value for name, value in dict(
            num_experts=num_experts, k=k, hidden_size=hidden_size, num_groups=num_groups,
            group_k=group_k, gating=gating, noisy_gating=noisy_gating,
            noise_epsilon=noise_epsilon, bias_update_rate=bias_update_rate,
            threshold_loss_weight=threshold_loss_weight,
            switch_loss_weight=switch_loss_weight, top_p_threshold=top_p_threshold,
            normalize_top_k=normalize_top_k, router_bias=router_bias,
            router_z_loss_weight=router_z_loss_weight, importance_weight=importance_weight,
            load_weight=load_weight,
            dispatch=dispatch, capacity_factor=capacity_factor,
            capacity_group_size=capacity_group_size,
            recompute_activations=recompute_activations,
            compiled_kernels=compiled_kernels, expert_activation=expert_activation,
            gated_experts=gated_experts, expert_bias=expert_bias).items()
            if value is not None}
        self.config = _moe_config(config, settings)
        if output_size is not None and (isinstance(output_size, bool) or not isinstance(
                output_size, int) or output_size < 1):
            raise ValueError(f"SparselyGatedMoE: `output_size` must be a positive integer; "
                             f"got {output_size!r}.")
        if self.config.compiled_kernels is True:
            # What can be known before any operand (built, no GPU), refused now.
            kernels.op_library_for(required=True)
        self.output_size = output_size
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)
        self.expert_kernel_storage = expert_kernel_storage
        self.seed = seed
        self.supports_masking = True

        self.gate = GATES[self.config.gating].from_moe_config(self.config, seed=seed,
                                                             name="gate")
        self.experts = None  # built once the input width is known
        self.expert_sharding = None  # runtime placement (see `shard_experts`)
        # The sparse path has dynamic shapes and a while loop: no XLA.
        self.supports_jit = self.config.dispatch == "capacity"
        self._create_balance_metrics()

    def _create_balance_metrics(self):
        """The metrics behind `balance_statistics`, named after the layer."""
        self.cv_importance_metric = keras.metrics.Mean(name=f"{self.name}_cv_importance")
        self.cv_load_metric = keras.metrics.Mean(name=f"{self.name}_cv_load")
        self.max_mean_load_metric = keras.metrics.Mean(name=f"{self.name}_max_mean_load")
        self.dropped_fraction_metric = keras.metrics.Mean(
            name=f"{self.name}_dropped_fraction")
        self.experts_per_token_metric = keras.metrics.Mean(
            name=f"{self.name}_experts_per_token")
        self.load_fraction_metric = ExpertLoadFraction(
            self.config.num_experts, name=f"{self.name}_load_fraction")

    def __getattr__(self, name):
        # The MoE settings read as attributes (`layer.k`, `layer.dispatch`).
        if name in _CONFIG_FIELDS and "config" in self.__dict__:
            return getattr(self.__dict__["config"], name)
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    @property
    def assignments_per_token(self) -> int:
        return self.gate.assignments_per_token

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
        # Keras then names a later call's wrong width itself, before any matmul fails.
        self.input_spec = keras.layers.InputSpec(min_ndim=2, axes={-1: input_dim})
        self.gate.build((None, input_dim))
        self.experts = FeedForwardExperts(
            num_experts=self.num_experts, hidden_size=self.hidden_size,
            output_size=self.output_size or input_dim,
            kernel_initializer=self.kernel_initializer,
            bias_initializer=self.bias_initializer,
            recompute_activations=self.recompute_activations,
            compiled_kernels=self.compiled_kernels,
            kernel_storage=self.expert_kernel_storage,
            activation=self.expert_activation, gated=self.gated_experts,
            use_bias=self.expert_bias, dtype=self.dtype_policy,
            name="experts")
        self.experts.build((None, input_dim))

    def quantize_experts(self, storage: str) -> None:
        """Stores the trained experts' kernels in "bfloat16" or weight-only "int8" (a
        scale per expert and output channel), dequantised in the graph: smaller exports
        for inference. The kernels are no longer trainable."""
        if not self.built:
            raise ValueError(f"SparselyGatedMoE {self.name!r}: quantize_experts needs a "
                             "built layer.")
        self.experts.quantize_kernels(storage)
        self.expert_kernel_storage = storage

    def call(self, inputs, *, training=None, mask=None):
        tokens, token_mask = self._flatten(inputs, mask)
        gate_output = self.gate(tf.cast(tokens, tf.float32), training=training,
                                token_mask=token_mask)
        outputs, dropped_fraction = self._dispatch(tokens, gate_output.routing,
                                                   training=training)
        if training:
            self._record_balance(gate_output, dropped_fraction,
                                 self._tokens_that_count(tokens, token_mask))
        output_shape = tf.concat([tf.shape(inputs)[:-1], [self.experts.output_size]], 0)
        return tf.reshape(outputs, output_shape)

    def _dispatch(self, tokens, routing, *, training):
        """`[tokens, d_in]` -> `[tokens, d_out]` by the configured dispatch, and the
        fraction of the assignments it dropped."""
        if self.dispatch == "sparse":
            return sparse_dispatch(
                tokens, routing, self.experts,
                compiled_kernels=self.compiled_kernels if training is True else False,
                gathered_weights_up_to=0 if training else self.experts.per_assignment_limit
            ), tf.zeros([])
        num_tokens = tokens.shape[0] if tokens.shape[0] is not None else tf.shape(tokens)[0]
        if self.expert_sharding is not None:
            num_tokens = self.expert_sharding.tokens_per_device(num_tokens)
        token_group_size = self.capacity_group_size or num_tokens
        capacity = expert_capacity(token_group_size, self.assignments_per_token,
                                   self.num_experts, self.capacity_factor)
        return capacity_dispatch(
            tokens, routing, self.experts, capacity=capacity,
            token_group_size=self.capacity_group_size, expert_sharding=self.expert_sharding,
            compiled_kernels=self.compiled_kernels if training is True else False)

    def shard_experts(self, expert_sharding: Optional[ExpertSharding]) -> None:
        """Runs the layer with its experts split over a DTensor mesh, or (None) not.

        Only places the computation: the caller backs the weights with DVariables of
        `expert_sharding.weight_layout` and feeds batch-sharded inputs. Needs
        dispatch="capacity" (the sparse dispatch's sort and while loop have no DTensor
        layout propagation) and top-k gating (the balanced gate picks each expert's top
        tokens over the whole batch with a scatter that DTensor cannot shard). Each
        device routes its share of the batch as its token groups (in groups of
        `capacity_group_size` when set, which must divide that share).
        """
        if expert_sharding is not None:
            if self.dispatch != "capacity":
                raise ValueError(
                    f"SparselyGatedMoE {self.name!r}: sharding the experts with DTensor "
                    f"needs dispatch='capacity'; the layer has dispatch={self.dispatch!r}.")
            if not self.gate.supports_expert_sharding:
                supported = [name for name, gate in GATES.items()
                             if gate.supports_expert_sharding]
                raise ValueError(
                    f"SparselyGatedMoE {self.name!r}: sharding the experts with DTensor "
                    f"needs gating={'/'.join(map(repr, supported))}; the layer has "
                    f"gating={self.gating!r}.")
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
        of the tokens each expert was routed, before any drop), `dropped_fraction` (the
        share of the assignments the capacity dispatch dropped; 0 for the sparse
        dispatch), `experts_per_token` (the mean experts a token that counts was routed
        to, before any drop) and `load_fraction` `[experts]`.
        """
        return {
            "cv_importance": self.cv_importance_metric.result(),
            "cv_load": self.cv_load_metric.result(),
            "max_mean_load": self.max_mean_load_metric.result(),
            "dropped_fraction": self.dropped_fraction_metric.result(),
            "experts_per_token": self.experts_per_token_metric.result(),
            "load_fraction": self.load_fraction_metric.result(),
        }

    def _record_balance(self, gate_output, dropped_fraction, num_tokens):
        """Adds the balancing loss, updates the balance metrics and lets the gate adapt
        (training only).

        Under a tf.distribute strategy Importance, Load and the counts are summed over the
        replicas first, so every replica adds the loss of the global batch (see the class
        docstring for how a training step scales it) and every gate adapts alike.
        """
        importance, load = gate_output.importance, gate_output.load
        counts = gate_output.routing.expert_counts()
        context = tf.distribute.get_replica_context()
        router_z = (tf.zeros([]) if gate_output.router_z is None
                    else tf.reduce_sum(gate_output.router_z))
        if context is not None and context.num_replicas_in_sync > 1:
            importance, load, counts, num_tokens, router_z = context.all_reduce(
                tf.distribute.ReduceOp.SUM,
                [importance, load, counts, num_tokens, router_z])
        self.gate.adapt(counts)
        if self.router_z_loss_weight:
            self.add_loss(self.router_z_loss_weight
                          * tf.math.divide_no_nan(router_z, num_tokens))
        if self.importance_weight or self.load_weight:
            self.add_loss(balancing_loss(
                importance, load, importance_weight=self.importance_weight,
                load_weight=self.load_weight))
        self.cv_importance_metric.update_state(tf.sqrt(cv_squared(importance)))
        self.cv_load_metric.update_state(tf.sqrt(cv_squared(load)))
        self.max_mean_load_metric.update_state(
            tf.math.divide_no_nan(tf.reduce_max(counts), tf.reduce_mean(counts)))
        self.load_fraction_metric.update_state(counts)
        self.dropped_fraction_metric.update_state(dropped_fraction)
        self.experts_per_token_metric.update_state(
            tf.math.divide_no_nan(tf.reduce_sum(counts), num_tokens))

    @staticmethod
    def _tokens_that_count(tokens, token_mask) -> tf.Tensor:
        """float32 scalar: the unmasked tokens of `[tokens, d]`."""
        if token_mask is None:
            return tf.cast(tf.shape(tokens)[0], tf.float32)
        return tf.reduce_sum(tf.cast(token_mask, tf.float32))

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
        config.update(dataclasses.asdict(self.config))
        config.update(
            output_size=self.output_size,
            kernel_initializer=keras.initializers.serialize(self.kernel_initializer),
            bias_initializer=keras.initializers.serialize(self.bias_initializer),
            expert_kernel_storage=self.expert_kernel_storage, seed=self.seed)
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        settings = {name: config.pop(name) for name in _CONFIG_FIELDS if name in config}
        return cls(config=MoEConfig.from_dict(settings), **config)


def _moe_config(config: Optional[MoEConfig], settings: dict) -> MoEConfig:
    """The layer's MoEConfig: `config`, or one from the keyword `settings`."""
    if config is None:
        try:
            return MoEConfig(**settings)
        except ValueError as error:
            raise ValueError(str(error).replace("MoEConfig:", "SparselyGatedMoE:", 1)
                             ) from None
    if settings:
        raise ValueError(f"SparselyGatedMoE: pass the MoE settings either as `config` or "
                         f"as keyword arguments, not both (got config and "
                         f"{sorted(settings)}).")
    if not isinstance(config, MoEConfig):
        raise ValueError(f"SparselyGatedMoE: `config` must be a moe_tf.MoEConfig; got "
                         f"{type(config).__name__}.")
    return config
