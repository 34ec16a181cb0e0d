"""Sparse experts for keras-hub's MoE language models: `sparsify(model)`.

keras-hub's MoE blocks (Mixtral, Qwen-MoE, Qwen3-MoE, Qwen3.5-MoE, GPT-OSS) run every
expert on every token and then keep the k chosen ones' outputs: E / k times the work of
the model. `sparsify`
replaces each such block, in place, by a `KerasHubSparseMoE` holding the same weight
values (re-laid-out, never retrained) that runs moe_tf's dropless sparse dispatch:
each token goes through its k experts only.

    import keras_hub
    from moe_tf.integrations.keras_hub import sparsify

    causal_lm = keras_hub.models.MixtralCausalLM.from_preset(...)
    sparsify(causal_lm)          # the same model object, now sparse
    causal_lm.generate("...")

What each family maps to (`SparselyGatedMoE` settings):

| keras-hub block | gate | experts |
| --- | --- | --- |
| `MixtralSparseMoeBlock` | softmax_top_k, renormalised, Switch loss x `router_aux_loss_coef` | SwiGLU (gate and up kernels concatenated), no biases |
| `Qwen3SparseMoeBlock` | softmax_top_k, renormalised iff `norm_top_k_prob`, Switch loss x `router_aux_loss_coefficient` | SwiGLU (its gate_up kernel as it is), no biases |
| `QwenSparseMoeBlock` (Qwen-MoE) | as Qwen3's | as Qwen3's, plus its shared SwiGLU expert and its sigmoid gate |
| `Qwen3_5MoeSparseMoeBlock` | softmax_top_k, renormalised, Switch loss | as Qwen-MoE's |
| `GptOssSparseMoeBlock` | softmax_top_k with the router's bias (the softmax of the top-k logits), no loss | GPT-OSS's clamped GLU (its interleaved gate/up columns split into halves), biases |

Outputs equal the original's to float32 rounding; the second output (router logits, or
GPT-OSS's dense router scores) too. Differences, by design: in training calls the tokens
that the block's mask marks as padding are not dispatched (they output zeros, and they do
not count in the balancing loss, as in the originals' loss); the Qwen-MoE and Qwen3-MoE
decoders pass their mask only to their own block classes, so there every token counts. Mixtral's training-only
`router_jitter_noise` is not reproduced (a warning says so). Sparsify before `compile`.
keras-hub is an optional dependency (`pip install moe_tf[keras-hub]`).
"""

from typing import Callable, Dict, NamedTuple, Optional

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from moe_tf.experts import FeedForwardExperts
from moe_tf.sparsely_gated_moe import SparselyGatedMoE

ROUTER_OUTPUTS = ("logits", "scores")


@keras.saving.register_keras_serializable(package="moe_tf")
class KerasHubSparseMoE(keras.layers.Layer):
    """A keras-hub MoE block's stand-in: the same call and outputs, moe_tf's sparse
    dispatch inside.

    Args:
        moe: the `SparselyGatedMoE` keyword arguments (its MoE settings).
        router_output: the block's second output: "logits" (x W_g (+ b_g), float32
            `[tokens, experts]`, Mixtral's and Qwen's) or "scores" (the dense gates
            `[tokens, experts]`, GPT-OSS's).
        shared_expert_hidden_size: for the Qwen blocks with a shared expert, its hidden
            width: every token adds sigmoid(x w_shared) * shared(x), `shared_expert` a
            one-expert `FeedForwardExperts` (gated like the routed experts, no biases)
            and `shared_expert_gate` a `Dense(1)` without bias. None: no shared expert.

    Call arguments:
        hidden_states: `[batch, sequence, hidden_dim]`.
        attention_mask: optional padding mask `[batch, sequence]` or attention mask
            `[batch, sequence, sequence]` (a position counts if any entry of its row is
            true); used in training calls only (see the module docstring).
        training: balancing loss and statistics only while training.

    Returns:
        (`[batch, sequence, hidden_dim]`, the router output).
    """

    def __init__(self, *, moe: Dict, router_output: str = "logits",
                 shared_expert_hidden_size: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        self.shared_expert_hidden_size = shared_expert_hidden_size
        if router_output not in ROUTER_OUTPUTS:
            raise ValueError(f"KerasHubSparseMoE: `router_output` must be one of "
                             f"{ROUTER_OUTPUTS}; got {router_output!r}.")
        self.moe_settings = dict(moe)
        self.router_output = router_output
        self.moe = SparselyGatedMoE(**self.moe_settings, dtype=self.dtype_policy, name="moe")
        self.shared_expert = self.shared_expert_gate = None  # built with the width

    def build(self, input_shape):
        self.moe.build(input_shape)
        if self.shared_expert_hidden_size is not None:
            self.shared_expert = FeedForwardExperts(
                num_experts=1, hidden_size=self.shared_expert_hidden_size,
                output_size=input_shape[-1], gated=self.moe.gated_experts,
                activation=self.moe.expert_activation, use_bias=False,
                dtype=self.dtype_policy, name="shared_expert")
            self.shared_expert.build(input_shape)
            self.shared_expert_gate = keras.layers.Dense(
                1, use_bias=False, dtype=self.dtype_policy, name="shared_expert_gate")
            self.shared_expert_gate.build(input_shape)

    def call(self, hidden_states, attention_mask=None, training=None):
        mask = None
        if training and attention_mask is not None:
            mask = tf.cast(attention_mask, tf.bool)
            if mask.shape.rank == 3:
                mask = tf.reduce_any(mask, axis=-1)
        outputs = self.moe(hidden_states, training=training, mask=mask)
        if self.shared_expert is not None:
            # The one shared expert as a batched expert: a buffer of every token.
            shared = tf.reshape(self.shared_expert(tokens_of(hidden_states)[None]),
                                tf.shape(hidden_states))
            outputs += tf.sigmoid(self.shared_expert_gate(hidden_states)) * shared
        tokens = tf.cast(tokens_of(hidden_states), tf.float32)
        if self.router_output == "logits":
            return outputs, self.moe.gate.router_logits(tokens)
        return outputs, self.moe.gate_values(tokens)

    def get_config(self):
        config = super().get_config()
        config.update(moe=self.moe_settings, router_output=self.router_output,
                      shared_expert_hidden_size=self.shared_expert_hidden_size)
        return config


def tokens_of(hidden_states):
    """`[..., d]` -> `[tokens, d]`."""
    return tf.reshape(hidden_states, [-1, hidden_states.shape[-1]])


class _Family(NamedTuple):
    """How one keras-hub MoE block maps onto `KerasHubSparseMoE`."""

    block_class: str               # the keras-hub block's class name
    settings: Callable             # block -> SparselyGatedMoE keyword arguments
    weights: Callable              # block -> {moe_tf weight path: value}
    router_output: str
    shared: Callable = lambda block: None  # block -> its shared expert layer, if any


def _activation_name(activation) -> str:
    return keras.activations.serialize(activation)


def _mixtral_settings(block) -> Dict:
    if block.router_jitter_noise:
        logging.warning("sparsify: %s's router_jitter_noise (%g, training only) is not "
                        "reproduced by moe_tf's gate.", block.name, block.router_jitter_noise)
    return dict(num_experts=block.num_experts, k=block.top_k,
                hidden_size=block.intermediate_dim, gating="softmax_top_k",
                normalize_top_k=True, switch_loss_weight=block.router_aux_loss_coef,
                gated_experts="glu",
                expert_activation=_activation_name(block.expert_bank.activation),
                expert_bias=False)


def _mixtral_weights(block) -> Dict:
    bank = block.expert_bank
    return {"gate/w_gate": block._sparse_feedforward_gate_dense.kernel,
            "experts/kernel_in": np.concatenate(
                [np.asarray(bank._expert_feedforward_gate_dense),
                 np.asarray(bank._expert_feedforward_intermediate_dense)], axis=-1),
            "experts/kernel_out": bank._expert_feedforward_output_dense}


def _qwen3_settings(block) -> Dict:
    return dict(num_experts=block.num_experts, k=block.top_k,
                hidden_size=block.intermediate_dim, gating="softmax_top_k",
                normalize_top_k=bool(block.norm_top_k_prob),
                switch_loss_weight=block.router_aux_loss_coefficient, gated_experts="glu",
                expert_activation=_activation_name(block.expert_bank.activation),
                expert_bias=False)


def _qwen3_weights(block) -> Dict:
    bank = block.expert_bank
    return {"gate/w_gate": block._sparse_feedforward_gate_dense.kernel,
            "experts/kernel_in": bank._expert_feedforward_gate_dense,  # [gate | up] halves
            "experts/kernel_out": bank._expert_feedforward_output_dense}


def _qwen_shared(block):
    return block.shared_expert_dense, block.shared_expert_gate_dense


def _qwen3_5_settings(block) -> Dict:
    # Its experts apply silu whatever the config says.
    return dict(num_experts=block.num_experts, k=block.top_k,
                hidden_size=block.moe_intermediate_dim, gating="softmax_top_k",
                normalize_top_k=True, switch_loss_weight=block.router_aux_loss_coefficient,
                gated_experts="glu", expert_activation="silu", expert_bias=False)


def _qwen3_5_weights(block) -> Dict:
    bank = block.expert_bank
    return {"gate/w_gate": block._router_gate.kernel,
            "experts/kernel_in": bank._expert_feedforward_gate_dense,
            "experts/kernel_out": bank._expert_feedforward_output_dense}


def _qwen3_5_shared(block):
    return block.shared_expert, block._shared_expert_gate


def _shared_expert_weights(shared) -> Dict:
    """A Qwen shared expert (its MLP and gate layers) as `KerasHubSparseMoE` weights."""
    mlp, gate = shared
    return {"shared_expert/kernel_in": np.concatenate(
                [np.asarray(mlp._feedforward_gate_dense.kernel),
                 np.asarray(mlp._feedforward_intermediate_dense.kernel)], axis=-1)[None],
            "shared_expert/kernel_out": np.asarray(mlp._feedforward_output_dense.kernel)[None],
            "shared_expert_gate/kernel": gate.kernel}


def _gpt_oss_settings(block) -> Dict:
    return dict(num_experts=block.num_experts, k=block.top_k,
                hidden_size=block.intermediate_dim, gating="softmax_top_k",
                normalize_top_k=True, router_bias=True, switch_loss_weight=0.0,
                gated_experts="gpt_oss", expert_bias=True)


def _halves(interleaved) -> np.ndarray:
    """GPT-OSS's gate/up columns (gate, up, gate, up, ...) as [gate | up] halves."""
    values = np.asarray(interleaved)
    return np.concatenate([values[..., ::2], values[..., 1::2]], axis=-1)


def _gpt_oss_weights(block) -> Dict:
    router, experts = block.router.router_dense, block.experts
    return {"gate/w_gate": router.kernel, "gate/b_gate": router.bias,
            "experts/kernel_in": _halves(experts.gate_up_proj),
            "experts/bias_in": _halves(experts.gate_up_proj_bias),
            "experts/kernel_out": experts.down_proj,
            "experts/bias_out": experts.down_proj_bias}


FAMILIES = (
    _Family("MixtralSparseMoeBlock", _mixtral_settings, _mixtral_weights, "logits"),
    _Family("Qwen3SparseMoeBlock", _qwen3_settings, _qwen3_weights, "logits"),
    # Qwen-MoE (1.5) has Qwen3's routed experts and names, and a shared expert.
    _Family("QwenSparseMoeBlock", _qwen3_settings, _qwen3_weights, "logits", _qwen_shared),
    _Family("Qwen3_5MoeSparseMoeBlock", _qwen3_5_settings, _qwen3_5_weights, "logits",
            _qwen3_5_shared),
    _Family("GptOssSparseMoeBlock", _gpt_oss_settings, _gpt_oss_weights, "scores"),
)
_BY_CLASS = {family.block_class: family for family in FAMILIES}


def _assign(layer: keras.layers.Layer, values: Dict) -> None:
    """Assigns `values` ({"moe/gate/w_gate": value, ...}: attribute paths) to the built
    layer's weights, checking every shape; every trainable weight must be given."""
    targets = {}
    for path in values:
        target = layer
        for attribute in path.split("/"):
            target = getattr(target, attribute)
        targets[path] = target
    given = {id(weight) for weight in targets.values()}
    missing = [weight.path for weight in layer.trainable_weights if id(weight) not in given]
    if missing:
        raise ValueError(f"sparsify: no value for {missing}.")
    for path, value in values.items():
        value = np.asarray(value)
        if tuple(targets[path].shape) != value.shape:
            raise ValueError(f"sparsify: {targets[path].path} has shape "
                             f"{tuple(targets[path].shape)}; the keras-hub weight has "
                             f"{value.shape}.")
        targets[path].assign(value.astype(targets[path].dtype))


def _sparse_block(block, family: _Family, input_shape) -> KerasHubSparseMoE:
    """A built `KerasHubSparseMoE` holding `block`'s weight values."""
    shared = family.shared(block)
    replacement = KerasHubSparseMoE(
        moe=family.settings(block), router_output=family.router_output,
        shared_expert_hidden_size=shared and shared[0]._feedforward_gate_dense.units,
        dtype=block.dtype_policy, name=f"{block.name}_sparse")
    replacement.build(input_shape)
    values = {f"moe/{path}": value for path, value in family.weights(block).items()}
    if shared:
        values.update(_shared_expert_weights(shared))
    _assign(replacement, values)
    return replacement


def _replace_sublayer(parent, attribute: str, replacement) -> None:
    """parent.<attribute> = replacement, also in the parent's tracked sublayers (so that
    the old block's weights leave the model's weights)."""
    old = getattr(parent, attribute)
    tracker = parent._tracker
    locked = tracker.locked
    tracker.unlock()
    tracker.replace_tracked_value("layers", old, replacement)
    setattr(parent, attribute, replacement)
    if locked:
        tracker.lock()


def _moe_blocks(layer):
    """The (attribute, block, family) of every supported keras-hub MoE block held
    directly by `layer` (a decoder layer)."""
    for attribute, value in list(vars(layer).items()):
        family = _BY_CLASS.get(type(value).__name__)
        if family is not None and isinstance(value, keras.layers.Layer):
            yield attribute, value, family


def sparsify(model, *, input_dim: Optional[int] = None):
    """Replaces, in place, every supported keras-hub MoE block of `model` (a keras-hub
    backbone or task, e.g. a CausalLM) by a `KerasHubSparseMoE` with the same weight
    values, and returns `model`. See the module docstring for what is supported.

    Raises:
        ValueError: if `model` holds no supported MoE block (naming what is supported),
            or if a weight's shape does not match.
    """
    backbone = getattr(model, "backbone", model)
    layers = getattr(backbone, "transformer_layers", None)
    if layers is None:
        raise ValueError(f"sparsify: {type(model).__name__} is not a keras-hub backbone or "
                         f"task with `transformer_layers`.")
    width = input_dim or backbone.hidden_dim
    replaced = 0
    for layer in layers:
        for attribute, block, family in list(_moe_blocks(layer)):
            _replace_sublayer(layer, attribute,
                              _sparse_block(block, family, (None, None, width)))
            replaced += 1
    if not replaced:
        raise ValueError(
            f"sparsify: {type(model).__name__} has no MoE block that moe_tf can replace; "
            f"supported: {', '.join(family.block_class for family in FAMILIES)}.")
    return model
