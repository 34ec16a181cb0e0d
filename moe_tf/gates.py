"""The gates as Keras layers: flat noisy top-k, hierarchical, strictly balanced.

`gating.py` holds the paper's gating math as pure functions of tensors; this module holds
the layers that own the gate weights and apply that math (and `GATES`, the registry from
the layer's `gating` name to the gate class). "Group" means only the hierarchical layer's
groups of experts.

Every gate maps float32 tokens `[tokens, input_dim]` (and an optional boolean token mask
`[tokens]`) to a `GateOutput`: the routing for the dispatcher and the Importance and Load
vectors `[experts]` from which the layer forms its balancing loss. Gates always compute in
float32 (their dtype policy is fixed), whatever the model's mixed-precision policy.
"""

from typing import TYPE_CHECKING, ClassVar, Dict, Mapping, NamedTuple, Optional, Union

import keras
import tensorflow as tf

from moe_tf import gating, philox, routers
from moe_tf.routing import DenseRouting, SlotRouting


class GateOutput(NamedTuple):
    """What a gate decided for one batch of tokens.

    Attributes:
        routing: a `SlotRouting` or `DenseRouting`.
        importance: float32 `[experts]`, Importance(X).
        load: float32 `[experts]`, Load(X): the smooth estimator of Eq. 10 while training
            with noise, otherwise the number of tokens each expert receives.
        router_z: float32 `[tokens]`, each token's router z-loss term (ST-MoE),
            logsumexp(logits)^2 (summed over the levels of a hierarchical gate); 0 for
            masked tokens. The layer averages it over the batch when it adds the loss.
            None for a gate without logits.
    """

    routing: Union[SlotRouting, DenseRouting]
    importance: tf.Tensor
    load: tf.Tensor
    router_z: Optional[tf.Tensor] = None


def dense_gate_output(gate: tf.Tensor, logits: tf.Tensor,
                      token_weight: tf.Tensor) -> GateOutput:
    """The output of a gate that weights experts densely (`gate` `[tokens, experts]`,
    zero where an expert is not chosen): importance and load counted from `gate`, the
    router z-loss of `logits` `[tokens, experts]` for the tokens of weight 1."""
    routing = DenseRouting(gate=gate)
    return GateOutput(routing=routing, importance=routing.importance(),
                      load=routing.expert_counts(),
                      router_z=routers.router_z(logits) * token_weight)


def mask_as_float(mask: Optional[tf.Tensor], num_tokens) -> tf.Tensor:
    """`[tokens]` float32 of 1.0 for tokens that count, 0.0 for masked ones."""
    if mask is None:
        return tf.ones([num_tokens], tf.float32)
    return tf.cast(mask, tf.float32)


if TYPE_CHECKING:
    from moe_tf.config import MoEConfig

# The paper's balancing: w_importance = w_load = 0.1 unless a gate balances otherwise.
DEFAULT_CV_LOSS_WEIGHT = 0.1

# The layer's `gating` name -> the gate class (see `register_gate`).
GATES: Dict[str, type] = {}


def register_gate(name: str):
    """Class decorator: makes a `Gate` subclass the layer's `gating=name`."""
    def register(gate_class):
        GATES[name] = gate_class
        return gate_class
    return register


def gate_option_names() -> set:
    """Every MoEConfig setting that some registered gate declares as its own."""
    return {name for gate in GATES.values() for name in gate.options}


class Gate(keras.layers.Layer):
    """What a gate is to the layer; subclasses are registered with `register_gate`.

    A gate's contract:
    - `call(tokens, *, training, token_mask)`: float32 `[tokens, input_dim]` and bool
      `[tokens]` (or None) -> `GateOutput`: the routing the dispatcher moves tokens by,
      Importance and Load `[experts]`, from which the layer adds the balancing loss
      and records its statistics, and each token's router z term `[tokens]`. Masked
      tokens get gate 0 and count in none of them.
    - A loss of the gate's own (the balanced gate's threshold loss) goes through
      `add_loss` inside `call`, while training.
    - `assignments_per_token`: expert slots per token, which sizes the capacity
      dispatch's buffers.

    - `adapt(expert_counts)`: called by the layer once per training call with the
      tokens each expert received over all replicas; gates that balance by state
      rather than by a loss (the aux-loss-free bias) update it here.

    Class attributes and class methods describe what it reads of an `MoEConfig`:
    - `options`: the gate-specific settings it reads, with their defaults (MoEConfig
      refuses the others' settings for this gate);
    - `supports_hierarchy`: whether `num_groups` may be set;
    - `supports_expert_sharding`: whether DTensor can split its batch (see
      `SparselyGatedMoE.shard_experts`);
    - `config_problem(config)`: what the gate refuses in a config, or None;
    - `default_cv_loss_weight(config)`: the default of the paper's `importance_weight`
      and `load_weight` with this gate (0 for gates balanced otherwise).
    Gates compute in float32 whatever the policy; `seed` seeds their noise.
    """

    options: ClassVar[Mapping[str, object]] = {}
    supports_hierarchy: ClassVar[bool] = False
    supports_expert_sharding: ClassVar[bool] = False

    def __init__(self, *, seed: Optional[int] = None, **kwargs):
        kwargs["dtype"] = "float32"
        super().__init__(**kwargs)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        # Set by SparselyGatedMoE.shard_experts while the tokens are split over devices
        # (DTensor); a runtime placement, not configuration.
        self.batch_sharded = False

    @classmethod
    def config_problem(cls, config: "MoEConfig") -> Optional[str]:
        """Why this gate cannot run `config` (a sentence), or None."""
        return None

    @classmethod
    def default_cv_loss_weight(cls, config: "MoEConfig") -> float:
        return DEFAULT_CV_LOSS_WEIGHT

    def adapt(self, expert_counts: tf.Tensor) -> None:
        """expert_counts: float32 `[experts]` of one training call (all replicas)."""

    def get_config(self):
        config = super().get_config()
        config.update(seed=self.seed)
        return config

    @classmethod
    def from_moe_config(cls, config: "MoEConfig", *, seed: Optional[int],
                        name: str) -> "Gate":
        """The gate of a (validated) `MoEConfig`."""
        raise NotImplementedError

    @property
    def assignments_per_token(self) -> int:
        return self.k

    def _gate_weight(self, name: str, shape) -> keras.Variable:
        # Appendix A: zero gate weights give every expert the same start.
        return self.add_weight(name=name, shape=shape, initializer="zeros",
                               autocast=False)

    def _normal(self, shape) -> tf.Tensor:
        """Standard normal noise `shape` from the layer's seed generator, by Philox named
        (see moe_tf/philox.py)."""
        return philox.normal(shape, self.seed_generator)


class _NoisyTopKBase(Gate):
    """The settings and the noisy top-k step shared by the flat and hierarchical gates."""

    options = {"noisy_gating": True, "noise_epsilon": gating.DEFAULT_NOISE_EPSILON}
    supports_hierarchy = True
    supports_expert_sharding = True

    def _noisy_top_k(self, clean_logits: tf.Tensor, raw_noise_logits: Optional[tf.Tensor],
                     k: int, selection_bias: Optional[tf.Tensor] = None
                     ) -> gating.TopKGating:
        """Noisy top-k over the last axis; `raw_noise_logits` None means no noise."""
        if raw_noise_logits is None:
            return gating.noisy_top_k_gating(clean_logits, k,
                                             selection_bias=selection_bias,
                                             batch_sharded=self.batch_sharded)
        return gating.noisy_top_k_gating(
            clean_logits, k, noise=self._normal(tf.shape(clean_logits)),
            stddev=gating.noise_stddev(raw_noise_logits, self.noise_epsilon),
            selection_bias=selection_bias, batch_sharded=self.batch_sharded)


@register_gate("top_k")
@keras.saving.register_keras_serializable(package="moe_tf")
class NoisyTopKGate(_NoisyTopKBase):
    """Noisy top-k gating over `num_experts` experts (Section 2.1).

    Registered as gating="top_k"; with `num_groups` the layer gets the
    `HierarchicalNoisyTopKGate` instead.

    With `bias_update_rate` > 0 it balances without a loss, as DeepSeek-V3 does: a
    per-expert bias b `[experts]` (a non-trainable weight, in checkpoints) is added to the
    logits to choose the top k and nothing else (the gates are the softmax of the chosen
    experts' unbiased logits), and after every training call b_i += rate *
    sign(mean load - load_i), the loads counted over all replicas. The paper's CV losses
    then default to weight 0.

    Weights: `w_gate` and `w_noise`, `[input_dim, num_experts]`, zero-initialised, and
    `expert_bias` `[num_experts]` when `bias_update_rate` > 0.
    """

    options = {**_NoisyTopKBase.options, "bias_update_rate": 0.0}

    def __init__(self, *, num_experts: int, k: int, noisy_gating: bool = True,
                 noise_epsilon: float = gating.DEFAULT_NOISE_EPSILON,
                 bias_update_rate: float = 0.0, **kwargs):
        super().__init__(**kwargs)
        self.num_experts = num_experts
        self.k = k
        self.noisy_gating = noisy_gating
        self.noise_epsilon = noise_epsilon
        self.bias_update_rate = bias_update_rate

    @classmethod
    def from_moe_config(cls, config, *, seed, name):
        if config.is_hierarchical:
            return HierarchicalNoisyTopKGate.from_moe_config(config, seed=seed, name=name)
        return cls(num_experts=config.num_experts, k=config.k,
                   noisy_gating=config.noisy_gating, noise_epsilon=config.noise_epsilon,
                   bias_update_rate=config.bias_update_rate,
                   seed=seed, name=name)

    @classmethod
    def config_problem(cls, config):
        if config.bias_update_rate and config.is_hierarchical:
            return ("`bias_update_rate` (aux-loss-free balancing) applies to flat top_k "
                    "gating; a hierarchical layer balances by its losses.")
        if not config.bias_update_rate >= 0:
            return f"`bias_update_rate` must be >= 0; got {config.bias_update_rate!r}."
        return None

    @classmethod
    def default_cv_loss_weight(cls, config):
        return 0.0 if config.bias_update_rate else DEFAULT_CV_LOSS_WEIGHT

    def build(self, input_shape):
        input_dim = input_shape[-1]
        self.w_gate = self._gate_weight("w_gate", (input_dim, self.num_experts))
        self.w_noise = (self._gate_weight("w_noise", (input_dim, self.num_experts))
                        if self.noisy_gating else None)
        # Replicas compute the same update from all-reduced loads: the first one's
        # assignment stands for all.
        self.expert_bias = (self.add_weight(
            name="expert_bias", shape=(self.num_experts,), initializer="zeros",
            trainable=False, autocast=False, aggregation="only_first_replica")
            if self.bias_update_rate else None)

    def call(self, inputs, *, training=None, token_mask=None) -> GateOutput:
        """inputs: float32 `[tokens, input_dim]`; token_mask: bool `[tokens]` or None."""
        token_weight = mask_as_float(token_mask, tf.shape(inputs)[0])
        noisy = bool(training) and self.noisy_gating
        clean_logits = tf.matmul(inputs, self.w_gate)
        result = self._noisy_top_k(
            clean_logits, tf.matmul(inputs, self.w_noise) if noisy else None, self.k,
            selection_bias=self.expert_bias)
        routing = SlotRouting(expert_index=result.index,
                              gate=result.gate * token_weight[:, None],
                              num_experts=self.num_experts)
        load = tf.reduce_sum(result.load * token_weight[:, None], axis=0)
        return GateOutput(routing=routing, importance=routing.importance(), load=load,
                          router_z=routers.router_z(clean_logits) * token_weight)

    def adapt(self, expert_counts):
        if self.expert_bias is not None:
            self.expert_bias.assign_add(self.bias_update_rate * tf.sign(
                tf.reduce_mean(expert_counts) - expert_counts))

    def get_config(self):
        config = super().get_config()
        config.update(num_experts=self.num_experts, k=self.k,
                      noisy_gating=self.noisy_gating, noise_epsilon=self.noise_epsilon,
                      bias_update_rate=self.bias_update_rate)
        return config


@keras.saving.register_keras_serializable(package="moe_tf")
class HierarchicalNoisyTopKGate(_NoisyTopKBase):
    """Two-level noisy top-k gating (Appendix B).

    A primary gate picks `group_k` of `num_groups` groups; inside each picked group a
    secondary gate picks `k` of its `experts_per_group` experts. Expert (i, j) is expert
    number `i * experts_per_group + j`, and its gate is Gp(x)_i * G_i(x)_j.

    Weights: `w_gate`, `w_noise` `[input_dim, num_groups]` (primary) and
    `w_gate_secondary`, `w_noise_secondary` `[num_groups, input_dim, experts_per_group]`,
    all zero-initialised.
    """

    def __init__(self, *, num_groups: int, experts_per_group: int, group_k: int, k: int,
                 noisy_gating: bool = True,
                 noise_epsilon: float = gating.DEFAULT_NOISE_EPSILON, **kwargs):
        super().__init__(**kwargs)
        self.num_groups = num_groups
        self.experts_per_group = experts_per_group
        self.group_k = group_k
        self.k = k
        self.noisy_gating = noisy_gating
        self.noise_epsilon = noise_epsilon

    @classmethod
    def from_moe_config(cls, config, *, seed, name):
        return cls(num_groups=config.num_groups, experts_per_group=config.experts_per_group,
                   group_k=config.primary_k, k=config.k, noisy_gating=config.noisy_gating,
                   noise_epsilon=config.noise_epsilon,
                   seed=seed, name=name)

    @property
    def num_experts(self) -> int:
        return self.num_groups * self.experts_per_group

    @property
    def assignments_per_token(self) -> int:
        return self.group_k * self.k

    def build(self, input_shape):
        input_dim = input_shape[-1]
        self.w_gate = self._gate_weight("w_gate", (input_dim, self.num_groups))
        secondary_shape = (self.num_groups, input_dim, self.experts_per_group)
        self.w_gate_secondary = self._gate_weight("w_gate_secondary", secondary_shape)
        if self.noisy_gating:
            self.w_noise = self._gate_weight("w_noise", (input_dim, self.num_groups))
            self.w_noise_secondary = self._gate_weight("w_noise_secondary",
                                                       secondary_shape)
        else:
            self.w_noise = self.w_noise_secondary = None

    def call(self, inputs, *, training=None, token_mask=None) -> GateOutput:
        """inputs: float32 `[tokens, input_dim]`; token_mask: bool `[tokens]` or None."""
        token_weight = mask_as_float(token_mask, tf.shape(inputs)[0])
        noisy = bool(training) and self.noisy_gating
        primary_logits = tf.matmul(inputs, self.w_gate)
        primary = self._noisy_top_k(
            primary_logits,
            tf.matmul(inputs, self.w_noise) if noisy else None, self.group_k)

        def secondary_logits(weights):
            # [tokens, group_k, experts_per_group]: only the picked groups' gates.
            all_groups = tf.einsum("td,gde->tge", inputs, weights)
            return tf.gather(all_groups, primary.index, batch_dims=1)

        clean_secondary_logits = secondary_logits(self.w_gate_secondary)
        secondary = self._noisy_top_k(
            clean_secondary_logits,
            secondary_logits(self.w_noise_secondary) if noisy else None, self.k)

        slots = self.group_k * self.k
        expert_index = tf.reshape(
            primary.index[..., None] * self.experts_per_group + secondary.index,
            [-1, slots])
        gate = tf.reshape(primary.gate[..., None] * secondary.gate, [-1, slots])
        routing = SlotRouting(expert_index=expert_index, gate=gate * token_weight[:, None],
                              num_experts=self.num_experts)

        # Load_H(X)_ij = Load_p(X)_i * Load_i(X^(i))_j / |X^(i)|.
        primary_load = tf.reduce_sum(primary.load * token_weight[:, None], axis=0)
        group_ids = tf.reshape(primary.index, [-1])
        pair_weight = tf.reshape(tf.tile(token_weight[:, None], [1, self.group_k]), [-1])
        secondary_load = tf.math.unsorted_segment_sum(
            tf.reshape(secondary.load, [-1, self.experts_per_group]) * pair_weight[:, None],
            group_ids, self.num_groups)                                 # [groups, b]
        group_sizes = tf.math.unsorted_segment_sum(pair_weight, group_ids,
                                                   self.num_groups)     # |X^(i)|
        load = tf.math.divide_no_nan(primary_load[:, None] * secondary_load,
                                     group_sizes[:, None])
        # Both levels' z terms, the secondary's averaged over the token's picked groups.
        router_z = (routers.router_z(primary_logits) + tf.reduce_mean(
            routers.router_z(clean_secondary_logits), axis=-1)) * token_weight
        return GateOutput(routing=routing, importance=routing.importance(),
                          load=tf.reshape(load, [-1]), router_z=router_z)

    def get_config(self):
        config = super().get_config()
        config.update(num_groups=self.num_groups,
                      experts_per_group=self.experts_per_group, group_k=self.group_k,
                      k=self.k, noisy_gating=self.noisy_gating,
                      noise_epsilon=self.noise_epsilon)
        return config


@register_gate("balanced")
@keras.saving.register_keras_serializable(package="moe_tf")
class StrictlyBalancedGate(Gate):
    """Strictly balanced gating (Appendix F).

    X = softmax(x W_g) over all experts. While training each expert takes exactly the
    m = ceil(k |X| / n) tokens of the batch with the largest X for it (the batchwise mask);
    at inference a token goes to every expert i with X_i > T_i, T a learned per-expert
    threshold. A token's gates are its X renormalised over the experts it goes to.
    The threshold loss (Eq. 19 of the paper, averaged over tokens)
    sum_i (M_threshold(x, T)_i - M_batchwise(X, m)_i) (X_i - T_i)
    trains T only: X is held constant in it so that it does not pull on the gate.

    Weights: `w_gate` `[input_dim, num_experts]` (zeros) and `threshold` `[num_experts]`.
    """

    options = {"threshold_loss_weight": 1.0}
    supports_expert_sharding = True

    def __init__(self, *, num_experts: int, k: int, threshold_loss_weight: float = 1.0,
                 **kwargs):
        super().__init__(**kwargs)
        self.num_experts = num_experts
        self.k = k
        self.threshold_loss_weight = threshold_loss_weight

    @classmethod
    def from_moe_config(cls, config, *, seed, name):
        return cls(num_experts=config.num_experts, k=config.k,
                   threshold_loss_weight=config.threshold_loss_weight,
                   seed=seed, name=name)

    def build(self, input_shape):
        self.w_gate = self._gate_weight("w_gate", (input_shape[-1], self.num_experts))
        self.threshold = self._gate_weight("threshold", (self.num_experts,))

    def call(self, inputs, *, training=None, token_mask=None) -> GateOutput:
        """inputs: float32 `[tokens, input_dim]`; token_mask: bool `[tokens]` or None."""
        num_tokens = tf.shape(inputs)[0]
        token_weight = mask_as_float(token_mask, num_tokens)
        logits = tf.matmul(inputs, self.w_gate)
        probs = tf.nn.softmax(logits, axis=-1)                          # X, [T, E]
        threshold_mask = tf.cast(probs > self.threshold, tf.float32)
        if training:
            batch_mask = gating.batchwise_mask(probs, token_weight, self.k)
            disagreement = (threshold_mask - batch_mask) * (
                tf.stop_gradient(probs) - self.threshold)
            threshold_loss = tf.math.divide_no_nan(
                tf.reduce_sum(disagreement * token_weight[:, None]),
                tf.reduce_sum(token_weight))
            if self.threshold_loss_weight:
                self.add_loss(self.threshold_loss_weight * threshold_loss)
            selected = batch_mask
        else:
            selected = threshold_mask
        kept = probs * selected * token_weight[:, None]
        gate = tf.math.divide_no_nan(kept, tf.reduce_sum(kept, axis=-1, keepdims=True))
        return dense_gate_output(gate, logits, token_weight)

    def get_config(self):
        config = super().get_config()
        config.update(num_experts=self.num_experts, k=self.k,
                      threshold_loss_weight=self.threshold_loss_weight)
        return config
