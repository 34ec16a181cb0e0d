"""The gates of the routers that came after the paper, beside `gates.py`'s.

- `SwitchGate` ("switch"): top-1 routing with the Switch Transformer's balancing loss;
- `TopPGate` ("top_p"): dynamic k, experts taken until their probabilities reach p;
- `ExpertChoiceGate` ("expert_choice"): each expert takes its top tokens (Zhou et al.);
- `SoftmaxTopKGate` ("softmax_top_k"): the top k of softmax(x W_g + b_g), renormalised
  or not, as Mixtral, Qwen-MoE and GPT-OSS route (their keras-hub blocks).
All of them route by softmax(x W_g) over every expert, with W_g initialised small and
random (as the Switch Transformer does) rather than zero: they have no noise to break the
ties of a zero start. None of them is hierarchical, and DTensor does not shard them.
The aux-loss-free bias is an option of top-k gating (`gates.NoisyTopKGate`); the router
z-loss, an option of every gate, is added by the layer from each gate's `router_z`.
"""

import math
from typing import Optional

import keras
import tensorflow as tf

from moe_tf import gating, routers
from moe_tf.gates import (Gate, GateOutput, dense_gate_output, mask_as_float,
                          register_gate)
from moe_tf.routing import SlotRouting, split_into_token_groups

# The Switch Transformer's weight of its balancing loss (alpha).
DEFAULT_SWITCH_LOSS_WEIGHT = 0.01
# Huang et al.'s threshold for dynamic ("top-p") routing.
DEFAULT_TOP_P_THRESHOLD = 0.4


class _SoftmaxRouter(Gate):
    """Routers on softmax(x W_g) over all experts.

    Weights: `w_gate` `[input_dim, num_experts]`, truncated normal of variance
    0.1 / input_dim (the Switch Transformer's scale).
    """

    def __init__(self, *, num_experts: int, k: int, **kwargs):
        super().__init__(**kwargs)
        self.num_experts = num_experts
        self.k = k

    @classmethod
    def from_moe_config(cls, config, *, seed, name):
        return cls(num_experts=config.num_experts, k=config.k, seed=seed, name=name,
                   **cls._own_settings(config))

    @classmethod
    def _own_settings(cls, config) -> dict:
        """The constructor arguments of this gate's own settings, from `config`."""
        return {option: getattr(config, option) for option in cls.options}

    @classmethod
    def default_cv_loss_weight(cls, config):
        return 0.0

    def build(self, input_shape):
        input_dim = input_shape[-1]
        self.w_gate = self.add_weight(
            name="w_gate", shape=(input_dim, self.num_experts), autocast=False,
            initializer=keras.initializers.TruncatedNormal(
                stddev=math.sqrt(0.1 / input_dim), seed=self.seed))

    def router_logits(self, inputs):
        """x W_g, float32 `[tokens, experts]`."""
        return tf.matmul(inputs, self.w_gate)

    def _logits_and_probabilities(self, inputs):
        """x W_g and softmax(x W_g), `[tokens, experts]` each."""
        logits = self.router_logits(inputs)
        return logits, tf.nn.softmax(logits, axis=-1)

    def get_config(self):
        config = super().get_config()
        config.update(num_experts=self.num_experts, k=self.k)
        return config


class _SwitchBalancedRouter(_SoftmaxRouter):
    """A softmax router that picks experts per token and balances them with the Switch
    Transformer's loss, `switch_loss_weight` * n * sum_i f_i P_i (computed on each
    replica's tokens, as the Switch Transformer computes it per device)."""

    options = {"switch_loss_weight": DEFAULT_SWITCH_LOSS_WEIGHT}

    def __init__(self, *, switch_loss_weight: float = DEFAULT_SWITCH_LOSS_WEIGHT,
                 **kwargs):
        super().__init__(**kwargs)
        self.switch_loss_weight = switch_loss_weight

    @classmethod
    def config_problem(cls, config):
        if not config.switch_loss_weight >= 0:
            return f"`switch_loss_weight` must be >= 0; got {config.switch_loss_weight!r}."
        return None

    def _routed(self, logits, probs, expert_index, gate, token_weight,
                training) -> GateOutput:
        routing = SlotRouting(expert_index=expert_index, gate=gate * token_weight[:, None],
                              num_experts=self.num_experts)
        counts = routing.expert_counts()
        if training and self.switch_loss_weight:
            self.add_loss(self.switch_loss_weight * routers.switch_balancing_loss(
                probs, counts, token_weight))
        return GateOutput(routing=routing, importance=routing.importance(), load=counts,
                          router_z=routers.router_z(logits) * token_weight)

    def get_config(self):
        config = super().get_config()
        config.update(switch_loss_weight=self.switch_loss_weight)
        return config


@register_gate("switch")
@keras.saving.register_keras_serializable(package="moe_tf")
class SwitchGate(_SwitchBalancedRouter):
    """Top-1 routing (Fedus et al. 2021): each token goes to its most probable expert,
    weighted by that probability (not renormalised, so the router gets a gradient).
    `k` must be 1."""

    @classmethod
    def config_problem(cls, config):
        if config.k != 1:
            return (f"gating='switch' routes each token to one expert: `k` must be 1; got "
                    f"{config.k}.")
        return super().config_problem(config)

    def call(self, inputs, *, training=None, token_mask=None) -> GateOutput:
        """inputs: float32 `[tokens, input_dim]`; token_mask: bool `[tokens]` or None."""
        token_weight = mask_as_float(token_mask, tf.shape(inputs)[0])
        logits, probs = self._logits_and_probabilities(inputs)
        top_prob, top_index = tf.math.top_k(probs, k=1)
        return self._routed(logits, probs, top_index, top_prob, token_weight, training)


@register_gate("top_p")
@keras.saving.register_keras_serializable(package="moe_tf")
class TopPGate(_SwitchBalancedRouter):
    """Dynamic k (Huang et al. 2024): a token takes experts in order of probability until
    their probabilities sum to `top_p_threshold`, at most `k`; each is weighted by its
    probability. The mean experts per token is in the layer's `experts_per_token`
    statistic. Balanced by the Switch loss, f_i counting assignments."""

    options = {**_SwitchBalancedRouter.options, "top_p_threshold": DEFAULT_TOP_P_THRESHOLD}

    def __init__(self, *, top_p_threshold: float = DEFAULT_TOP_P_THRESHOLD, **kwargs):
        super().__init__(**kwargs)
        self.top_p_threshold = top_p_threshold

    @classmethod
    def config_problem(cls, config):
        if not 0 < config.top_p_threshold <= 1:
            return (f"`top_p_threshold` must be in (0, 1]; got "
                    f"{config.top_p_threshold!r}.")
        return super().config_problem(config)

    def call(self, inputs, *, training=None, token_mask=None) -> GateOutput:
        """inputs: float32 `[tokens, input_dim]`; token_mask: bool `[tokens]` or None."""
        token_weight = mask_as_float(token_mask, tf.shape(inputs)[0])
        logits, probs = self._logits_and_probabilities(inputs)
        index, gate = routers.top_p_choices(probs, self.top_p_threshold, self.k)
        return self._routed(logits, probs, index, gate, token_weight, training)

    def get_config(self):
        config = super().get_config()
        config.update(top_p_threshold=self.top_p_threshold)
        return config


@register_gate("expert_choice")
@keras.saving.register_keras_serializable(package="moe_tf")
class ExpertChoiceGate(_SoftmaxRouter):
    """Expert-choice routing (Zhou et al. 2022): each expert takes the
    m = ceil(k |X| / n) tokens of its token group with the highest probability for it,
    and weights each by that probability (not renormalised). `k` is the mean experts per
    token; one token may get 0 to n experts. Balanced by construction: no loss.

    The group is the batch, or the dispatch's `capacity_group_size` tokens
    (`token_group_size`) when set, so that the capacity dispatch's buffers hold every
    choice. Masked tokens are never chosen and do not count in |X|. At inference the same
    rule runs on the batch given, so a token's experts depend on the other tokens of its
    group: for a causal language model the choice sees later positions of the batch, and a
    token generated alone is taken by every expert (m = 1). Use a token-choice gate where
    that matters.
    """

    def __init__(self, *, token_group_size: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        self.token_group_size = token_group_size

    @classmethod
    def _own_settings(cls, config) -> dict:
        return {"token_group_size": config.capacity_group_size}

    def call(self, inputs, *, training=None, token_mask=None) -> GateOutput:
        """inputs: float32 `[tokens, input_dim]`; token_mask: bool `[tokens]` or None."""
        num_tokens = tf.shape(inputs)[0]
        token_weight = mask_as_float(token_mask, num_tokens)
        logits, probs = self._logits_and_probabilities(inputs)
        grouped = split_into_token_groups(probs, self.token_group_size)  # [G, S, E]
        chosen = gating.batchwise_mask(
            grouped, split_into_token_groups(token_weight, self.token_group_size), self.k)
        gate = tf.reshape(grouped * chosen, [-1, self.num_experts])[:num_tokens]
        return dense_gate_output(gate, logits, token_weight)

    def get_config(self):
        config = super().get_config()
        config.update(token_group_size=self.token_group_size)
        return config


@register_gate("softmax_top_k")
@keras.saving.register_keras_serializable(package="moe_tf")
class SoftmaxTopKGate(_SwitchBalancedRouter):
    """Top-k of softmax(x W_g + b_g), the routing of Mixtral, Qwen-MoE and GPT-OSS: each
    token goes to its k most probable experts, weighted by their probabilities,
    renormalised to sum to 1 when `normalize_top_k` (the softmax of the k largest
    logits, as Mixtral and GPT-OSS compute it) or not (Qwen with norm_top_k_prob
    False). `router_bias` adds the bias b_g `[experts]` (GPT-OSS's router has one).
    Balanced by the Switch loss, f_i counting assignments, as those models' auxiliary
    loss (weight `switch_loss_weight`; 0 for none).
    """

    options = {**_SwitchBalancedRouter.options, "normalize_top_k": True,
               "router_bias": False}

    def __init__(self, *, normalize_top_k: bool = True, router_bias: bool = False,
                 **kwargs):
        super().__init__(**kwargs)
        self.normalize_top_k = normalize_top_k
        self.router_bias = router_bias

    def build(self, input_shape):
        super().build(input_shape)
        if self.router_bias:
            self.b_gate = self.add_weight(name="b_gate", shape=(self.num_experts,),
                                          initializer="zeros", autocast=False)

    def router_logits(self, inputs):
        """x W_g (+ b_g), float32 `[tokens, experts]`."""
        logits = super().router_logits(inputs)
        return logits + self.b_gate if self.router_bias else logits

    def call(self, inputs, *, training=None, token_mask=None) -> GateOutput:
        """inputs: float32 `[tokens, input_dim]`; token_mask: bool `[tokens]` or None."""
        token_weight = mask_as_float(token_mask, tf.shape(inputs)[0])
        logits, probs = self._logits_and_probabilities(inputs)
        top_probs, top_index = tf.math.top_k(probs, k=self.k)
        if self.normalize_top_k:
            top_probs /= tf.reduce_sum(top_probs, axis=-1, keepdims=True)
        return self._routed(logits, probs, top_index, top_probs, token_weight, training)

    def get_config(self):
        config = super().get_config()
        config.update(normalize_top_k=self.normalize_top_k, router_bias=self.router_bias)
        return config
