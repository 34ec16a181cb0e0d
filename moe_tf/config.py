"""`MoEConfig`: every setting of an MoE layer in one frozen, self-validating value.

The layer (`SparselyGatedMoE(config=...)` or its keyword arguments), the model configs
(`LanguageModelConfig.moe`, `TranslationConfig.moe`) and the training binaries' flags all
hold this one object; its field defaults are the project's defaults, written once here.

Gate-specific settings (`noisy_gating`, `noise_epsilon`, `bias_update_rate`,
`threshold_loss_weight`, `switch_loss_weight`, `top_p_threshold`, `normalize_top_k`,
`router_bias`) are None until a config
is built: then the chosen gate's defaults fill them in, and a setting that the gate does
not read is refused, naming both. So are the paper's loss weights `importance_weight` and
`load_weight`: 0.1 each, or 0 with a gate balanced otherwise. A built config therefore
always holds resolved values, and `MoEConfig(**dataclasses.asdict(config)) == config`.
"""

import dataclasses
from typing import Optional, Union

import keras

from moe_tf import router_gates  # noqa: F401  (registers the later routers' gates)
from moe_tf.experts import GATED_VARIANTS
from moe_tf.gates import GATES, gate_option_names

DISPATCHES = ("sparse", "capacity")
# GShard's training capacity factor; the capacity dispatch's default.
DEFAULT_CAPACITY_FACTOR = 2.0
# Settings only the capacity dispatch reads (the sparse dispatch has no slots).
_CAPACITY_OPTIONS = ("capacity_factor", "capacity_group_size")
# What gate-specific settings defaulted to before gates declared them: a config written
# then lists them whatever the gate (see `from_dict`).
_LEGACY_GATE_DEFAULTS = {"noisy_gating": True, "noise_epsilon": 1e-2,
                         "threshold_loss_weight": 1.0}


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """The settings of one Sparsely-Gated MoE layer.

    Attributes:
        num_experts: n, the number of experts.
        k: experts per token (per selected group when hierarchical).
        hidden_size: the hidden width of every expert.
        num_groups: a, for a hierarchical MoE of `num_groups` groups of
            `num_experts / num_groups` experts (Appendix B); None for a flat MoE.
        group_k: groups per token at the primary level of a hierarchical MoE; defaults to
            `k`.
        gating: the gate, a name of `moe_tf.gates.GATES`: "top_k" (noisy top-k, flat or
            hierarchical), "balanced" (the strictly balanced gating of Appendix F),
            "switch" (top-1, Switch Transformer), "top_p" (dynamic k),
            "expert_choice" (each expert picks its tokens) or "softmax_top_k" (Mixtral's,
            Qwen-MoE's and GPT-OSS's routing).
        noisy_gating: top_k only: add the trained Gaussian noise of Eq. 4 while training
            (default True).
        noise_epsilon: top_k only: the floor added to the noise scale softplus(x W_noise)
            (default 1e-2).
        bias_update_rate: top_k only (flat): > 0 balances without a loss (DeepSeek-V3's
            selection bias, moved by this rate after every training call); default 0.
        threshold_loss_weight: balanced only: the weight of the threshold loss
            (default 1.0).
        switch_loss_weight: switch, top_p and softmax_top_k: alpha, the weight of the
            Switch balancing loss (default 0.01).
        top_p_threshold: top_p only: p, the probability mass a token's experts must reach
            (default 0.4); `k` caps their number.
        normalize_top_k: softmax_top_k only: renormalise the k gates to sum to 1
            (default True).
        router_bias: softmax_top_k only: a trained bias on the router's logits (default
            False).
        router_z_loss_weight: every gate: the weight of the router z-loss (ST-MoE), the
            mean of logsumexp(logits)^2; default 0 (off).
        importance_weight: w_importance, the weight of CV(Importance)^2 (default 0.1, or
            0 for the switch, top_p and expert_choice gates and with bias_update_rate).
        load_weight: w_load, the weight of CV(Load)^2 (default as importance_weight).
        dispatch: "sparse" (dropless, sort-based) or "capacity" (fixed-size expert
            buffers, static shapes).
        capacity_factor: capacity only: slots per expert as a multiple of the even share,
            ceil(capacity_factor * tokens * assignments_per_token / experts)
            (default 2.0).
        capacity_group_size: capacity only: route the tokens in GShard token groups of
            this many, each with its own slots; None: the batch is one group.
        recompute_activations: recompute the experts' hidden activations on the backward
            pass instead of keeping them (Appendix D).
        compiled_kernels: the compiled CPU kernels of `moe_tf.kernels` in training calls of
            the sparse dispatch, as Keras's `LSTM(use_cudnn=...)`: "auto" uses them where
            they apply, True requires them (a clear error where they cannot run), False
            never uses them.
        expert_activation: the experts' activation, a Keras activation name (default
            "relu", the paper's).
        gated_experts: None (the paper's FFN experts), "glu" (SwiGLU-style experts:
            activation(x W_gate) * x W_up, then W_down) or "gpt_oss" (GPT-OSS's clamped
            variant); see `moe_tf.experts.FeedForwardExperts`.
        expert_bias: whether the experts have biases (default True).
    """

    num_experts: int = 32
    k: int = 4
    hidden_size: int = 256
    num_groups: Optional[int] = None
    group_k: Optional[int] = None
    gating: str = "top_k"
    noisy_gating: Optional[bool] = None
    noise_epsilon: Optional[float] = None
    bias_update_rate: Optional[float] = None
    threshold_loss_weight: Optional[float] = None
    switch_loss_weight: Optional[float] = None
    top_p_threshold: Optional[float] = None
    normalize_top_k: Optional[bool] = None
    router_bias: Optional[bool] = None
    router_z_loss_weight: float = 0.0
    importance_weight: Optional[float] = None
    load_weight: Optional[float] = None
    dispatch: str = "sparse"
    capacity_factor: Optional[float] = None
    capacity_group_size: Optional[int] = None
    recompute_activations: bool = False
    compiled_kernels: Union[str, bool] = "auto"
    expert_activation: str = "relu"
    gated_experts: Optional[str] = None
    expert_bias: bool = True

    def __post_init__(self):
        _check_gating(self)
        _check_sizes(self)
        _check_dispatch(self)
        self._fill_defaults()
        problem = GATES[self.gating].config_problem(self)
        if problem:
            _refuse(problem)
        for name in ("importance_weight", "load_weight", "router_z_loss_weight"):
            if not getattr(self, name) >= 0:
                _refuse(f"`{name}` must be >= 0; got {getattr(self, name)!r}.")
        if not isinstance(self.recompute_activations, bool):
            _refuse(f"`recompute_activations` must be a bool; got "
                    f"{self.recompute_activations!r}.")
        if not (isinstance(self.compiled_kernels, bool) or self.compiled_kernels == "auto"):
            _refuse(f"`compiled_kernels` must be 'auto', True or False; got "
                    f"{self.compiled_kernels!r}.")
        _check_experts(self)

    def _fill_defaults(self):
        gate = GATES[self.gating]
        defaults = dict(gate.options)
        if self.dispatch == "capacity":
            defaults["capacity_factor"] = DEFAULT_CAPACITY_FACTOR
        for name, default in defaults.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, default)
        # The loss weights' default depends on the gate's own settings, filled above.
        for name in ("importance_weight", "load_weight"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, gate.default_cv_loss_weight(self))

    @property
    def is_hierarchical(self) -> bool:
        return self.num_groups is not None

    @property
    def experts_per_group(self) -> int:
        return self.num_experts // (self.num_groups or 1)

    @property
    def primary_k(self) -> int:
        """Groups each token goes to at the primary level (1 for a flat layer)."""
        if not self.is_hierarchical:
            return 1
        return self.k if self.group_k is None else self.group_k

    @property
    def assignments_per_token(self) -> int:
        """Experts each token is sent to: k, or group_k * k when hierarchical (the
        balanced gate sends k per token on average)."""
        return self.primary_k * self.k

    @property
    def depends_on_token_order(self) -> bool:
        """Whether, at inference, a token's output can change with the order of the
        call's tokens: the capacity dispatch fills the experts' slots (and forms its
        groups) in token order and drops what overflows; with the sparse dispatch every
        gate routes a call's tokens as a set (expert choice too) and nothing is dropped."""
        return self.dispatch == "capacity"

    def ops_per_token(self, input_dim: int) -> int:
        """Forward multiply-adds per token, as the paper's Table 7 counts them: the gate's
        x W_g over all experts (or over the groups plus the `group_k` picked groups'
        secondary gates), as much again for x W_noise with noisy gating, and
        `assignments_per_token` experts of 2 input_dim hidden_size each (an expert's
        output width taken equal to its input's)."""
        d = input_dim
        if self.is_hierarchical:
            gate = d * self.num_groups + self.primary_k * d * self.experts_per_group
        else:
            gate = d * self.num_experts
        gate *= 2 if self.noisy_gating else 1
        # A gated expert has three projections (gate, up, down), the paper's two.
        projections = 3 if self.gated_experts else 2
        return gate + self.assignments_per_token * projections * d * self.hidden_size

    def replace(self, **changes) -> "MoEConfig":
        """A copy with `changes`; gate- and dispatch-specific settings are re-derived
        when `gating` or `dispatch` changes (unless given)."""
        values = dataclasses.asdict(self)
        if "gating" in changes:
            for name in gate_option_names():
                values[name] = None
        if "dispatch" in changes:
            for name in _CAPACITY_OPTIONS:
                values[name] = None
        values.update(changes)
        return MoEConfig(**values)

    @classmethod
    def from_dict(cls, values: dict) -> "MoEConfig":
        """A config from `dataclasses.asdict` output (other keys are ignored), including
        configs written before MoEConfig: those list every gate setting at its old
        default whatever the gate (the ones that do not apply are dropped), and their
        `compiled_kernels=True` meant what "auto" means now."""
        values = {name: value for name, value in values.items()
                  if name in {f.name for f in dataclasses.fields(cls)}}
        gate = GATES.get(values.get("gating", cls.gating))
        legacy = [name for name, old_default in _LEGACY_GATE_DEFAULTS.items()
                  if gate is not None and name not in gate.options
                  and values.get(name) == old_default]
        for name in legacy:
            values[name] = None
        if legacy and values.get("compiled_kernels") is True:
            values["compiled_kernels"] = "auto"
        return cls(**values)


def _refuse(message: str):
    raise ValueError(f"MoEConfig: {message}")


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _refuse(f"`{name}` must be a positive integer; got {value!r}.")


def _check_sizes(config: MoEConfig) -> None:
    """The expert counts, k and the hierarchy's shape."""
    _positive_int("num_experts", config.num_experts)
    _positive_int("k", config.k)
    _positive_int("hidden_size", config.hidden_size)
    if config.num_groups is None:
        if config.group_k is not None:
            _refuse("`group_k` needs `num_groups` (a hierarchical layer).")
        if config.k > config.num_experts:
            _refuse(f"`k` ({config.k}) must be <= num_experts ({config.num_experts}).")
        return
    _positive_int("num_groups", config.num_groups)
    if config.num_experts % config.num_groups:
        _refuse(f"`num_experts` ({config.num_experts}) must be divisible by "
                f"`num_groups` ({config.num_groups}).")
    if config.k > config.experts_per_group:
        _refuse(f"`k` ({config.k}) must be <= the experts per group (num_experts / "
                f"num_groups = {config.experts_per_group}).")
    if config.group_k is not None:
        _positive_int("group_k", config.group_k)
        if config.group_k > config.num_groups:
            _refuse(f"`group_k` ({config.group_k}) must be <= `num_groups` "
                    f"({config.num_groups}).")
    elif config.k > config.num_groups:
        _refuse(f"`group_k` defaults to k ({config.k}), which must be <= `num_groups` "
                f"({config.num_groups}); pass `group_k`.")


def _check_gating(config: MoEConfig) -> None:
    """The gate exists, supports the hierarchy if asked, and reads every gate setting
    that was given."""
    if config.gating not in GATES:
        _refuse(f"`gating` must be one of {tuple(GATES)}; got {config.gating!r}.")
    gate = GATES[config.gating]
    if config.is_hierarchical and not gate.supports_hierarchy:
        _refuse(f"gating={config.gating!r} is flat; it takes no `num_groups`.")
    for name in gate_option_names():
        if getattr(config, name) is not None and name not in gate.options:
            _refuse(f"`{name}` does not apply to gating={config.gating!r} (it applies to "
                    f"{_gates_reading(name)}).")
    if config.noise_epsilon is not None and not config.noise_epsilon > 0:
        _refuse(f"`noise_epsilon` must be > 0 (it keeps the load estimator finite); got "
                f"{config.noise_epsilon!r}.")
    if config.threshold_loss_weight is not None and not config.threshold_loss_weight >= 0:
        _refuse(f"`threshold_loss_weight` must be >= 0; got "
                f"{config.threshold_loss_weight!r}.")


def _check_experts(config: MoEConfig) -> None:
    if config.gated_experts is not None and config.gated_experts not in GATED_VARIANTS:
        _refuse(f"`gated_experts` must be None or one of {GATED_VARIANTS}; got "
                f"{config.gated_experts!r}.")
    try:
        keras.activations.get(config.expert_activation)
    except (ValueError, TypeError):
        _refuse(f"`expert_activation` must name a Keras activation; got "
                f"{config.expert_activation!r}.")
    if not isinstance(config.expert_bias, bool):
        _refuse(f"`expert_bias` must be a bool; got {config.expert_bias!r}.")
    if config.compiled_kernels is True and (config.gated_experts or
                                            config.expert_activation != "relu"):
        _refuse("compiled_kernels=True runs only the paper's ReLU experts; these experts "
                f"are expert_activation={config.expert_activation!r}, gated_experts="
                f"{config.gated_experts!r}. Use 'auto' or False.")


def _gates_reading(option: str) -> str:
    return ", ".join(f"gating={name!r}" for name, gate in GATES.items()
                     if option in gate.options)


def _check_dispatch(config: MoEConfig) -> None:
    if config.dispatch not in DISPATCHES:
        _refuse(f"`dispatch` must be one of {DISPATCHES}; got {config.dispatch!r}.")
    if config.dispatch != "capacity":
        for name in _CAPACITY_OPTIONS:
            if getattr(config, name) is not None:
                _refuse(f"`{name}` only applies to dispatch='capacity'; the sparse "
                        "dispatch has no slots and drops no token.")
    if config.capacity_factor is not None and not config.capacity_factor > 0:
        _refuse(f"`capacity_factor` must be > 0; got {config.capacity_factor!r}.")
    if config.capacity_group_size is not None:
        _positive_int("capacity_group_size", config.capacity_group_size)
