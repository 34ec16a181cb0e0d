"""The paper's language models (Appendix C), their compute-matched baselines (Table 7),
and the (MoE) Transformer of `models.transformer`.

The paper's four share the embedding, the residual/dropout wiring and the softmax; they
differ in what stands between the embedding and the softmax:
- `moe`: LSTM -> MoE (sigmoid on its output) -> LSTM;
- `4xlstm`: four LSTMs;
- `moe-1-wide`: LSTM -> one expert of hidden k * hidden_size -> LSTM;
- `moe-1-deep`: LSTM -> one expert of four hidden layers, as wide as keeps the ops equal ->
  LSTM.
Every layer's output gets dropout and a residual add, so all widths equal `model_dim`.
`transformer` and `transformer-moe` are built, stepped and counted by
`models.transformer`; this module's functions dispatch to it.
"""

import dataclasses
import math
from typing import Dict, List, Optional, Tuple

import keras
import tensorflow as tf

from models import transformer
from models.packed_sequences import PackedSequences, packed_lstm
from models.recorded_config import check_shared_settings, model_config_from_dict
from moe_tf import MoEConfig, PhiloxDropout, SparselyGatedMoE

LSTM_ARCHITECTURES = ("moe", "4xlstm", "moe-1-wide", "moe-1-deep")
ARCHITECTURES = LSTM_ARCHITECTURES + transformer.TRANSFORMER_ARCHITECTURES
DEEP_LAYERS = 4


@dataclasses.dataclass(frozen=True)
class LanguageModelConfig:
    """Sizes of a language model. Defaults are the paper's, scaled by 1/4 for a CPU.

    `moe` holds the MoE layer's settings (expert hidden width 256; paper: 1024); the
    baselines read `moe.k`, `moe.num_groups` and `moe.hidden_size` for their widths, and
    so do the Transformers' dense FFNs (k * hidden_size wide). `num_layers` and
    `num_heads` are the Transformers' (blocks, attention heads); the LSTM models have
    none.
    """

    architecture: str = "moe"
    vocab_size: int = 8192
    model_dim: int = 128           # embedding and LSTM width (paper: 512)
    moe: MoEConfig = MoEConfig()
    dropout: float = 0.1
    num_layers: int = 4
    num_heads: int = 4

    def __post_init__(self):
        check_shared_settings(self, ARCHITECTURES)
        if self.is_transformer:
            _check_transformer_sizes(self)

    @property
    def is_transformer(self) -> bool:
        return self.architecture in transformer.TRANSFORMER_ARCHITECTURES

    @classmethod
    def from_dict(cls, values: Dict) -> "LanguageModelConfig":
        """The config of a recorded `dataclasses.asdict`, also of runs recorded before
        `moe` (see `models.recorded_config`)."""
        return model_config_from_dict(cls, values)

    @property
    def experts_per_token(self) -> int:
        """Experts each token is sent to (k, or group_k * k when hierarchical)."""
        return self.moe.assignments_per_token

    @property
    def wide_hidden_size(self) -> int:
        """MoE-1-Wide: one expert doing the work of k experts."""
        return self.experts_per_token * self.moe.hidden_size

    @property
    def deep_hidden_size(self) -> int:
        """MoE-1-Deep: w with d w + (L - 1) w^2 + w d = k (2 d h), L = 4 hidden layers."""
        d, target = self.model_dim, 2 * self.model_dim * self.wide_hidden_size
        a, b = DEEP_LAYERS - 1, 2 * d
        return round((-b + math.sqrt(b * b + 4 * a * target)) / (2 * a))


def _check_transformer_sizes(config: LanguageModelConfig) -> None:
    for name in ("num_layers", "num_heads"):
        if getattr(config, name) < 1:
            raise ValueError(f"{name} must be >= 1; got {getattr(config, name)}.")
    if config.model_dim % config.num_heads:
        raise ValueError(f"model_dim ({config.model_dim}) must be divisible by num_heads "
                         f"({config.num_heads}).")
    if config.architecture == "transformer-moe" and config.num_layers < 2:
        raise ValueError("transformer-moe puts the MoE in every second block: num_layers "
                         f"must be >= 2; got {config.num_layers}.")


def _residual(x, y, dropout: float, name: str):
    return keras.layers.Add(name=f"{name}_residual")(
        [x, PhiloxDropout(dropout, name=f"{name}_dropout")(y)])


def _lstm(x, config: LanguageModelConfig, name: str):
    y = keras.layers.LSTM(config.model_dim, return_sequences=True, name=name)(x)
    return _residual(x, y, config.dropout, name)


def _blocks(config: LanguageModelConfig) -> Tuple[str, ...]:
    """The blocks between the embedding and the softmax, in order: the LSTMs by layer
    name, and "middle" for the MoE (or its dense stand-in) with its sigmoid."""
    if config.architecture == "4xlstm":
        return tuple(f"lstm_{i + 1}" for i in range(4))
    return ("lstm_1", "middle", "lstm_2")


def _middle_layer_names(config: LanguageModelConfig) -> List[str]:
    """The middle block's layers, in order: the MoE, or the hidden layers and output of
    the dense stand-in of a baseline."""
    if config.architecture == "moe":
        return ["moe"]
    name, layers = (("wide_expert", 1) if config.architecture == "moe-1-wide"
                    else ("deep_expert", DEEP_LAYERS))
    return [f"{name}_hidden_{i + 1}" for i in range(layers)] + [f"{name}_output"]


def _middle_layer(config: LanguageModelConfig, name: str) -> keras.layers.Layer:
    if name == "moe":
        return SparselyGatedMoE(config=config.moe, name=name)
    if name.endswith("_output"):
        return keras.layers.Dense(config.model_dim, name=name)
    width = (config.wide_hidden_size if config.architecture == "moe-1-wide"
             else config.deep_hidden_size)
    return keras.layers.Dense(width, activation="relu", name=name)


def build_language_model(config: LanguageModelConfig) -> keras.Model:
    """int32 token ids `[batch, time]` (0 = padding) -> float32 logits `[batch, time, vocab]`."""
    if config.is_transformer:
        return transformer.build_transformer_lm(config)
    ids = keras.Input(shape=(None,), dtype="int32", name="ids")
    x = keras.layers.Embedding(config.vocab_size, config.model_dim, mask_zero=True,
                               name="embedding")(ids)
    x = PhiloxDropout(config.dropout, name="embedding_dropout")(x)
    for block in _blocks(config):
        if block == "middle":
            middle = x
            for name in _middle_layer_names(config):
                middle = _middle_layer(config, name)(middle)
            x = _residual(x, keras.layers.Activation("sigmoid", name="middle_sigmoid")(
                middle), config.dropout, "middle")
        else:
            x = _lstm(x, config, block)
    logits = keras.layers.Dense(config.vocab_size, name="softmax", dtype="float32")(x)
    return keras.Model(ids, logits, name=f"lm_{config.architecture.replace('-', '_')}")


# A model's state for `language_model_step`: for the LSTM models each LSTM's name ->
# [h, c]; for the Transformers a `transformer.TransformerState` (key/value caches).
RecurrentState = Dict[str, List[tf.Tensor]]


def initial_state(model: keras.Model, config: LanguageModelConfig, batch_size,
                  length) -> RecurrentState:
    """The state of `model` (built by `build_language_model(config)`) before any position,
    for `batch_size` sequences of up to `length` positions: every LSTM's zero state,
    `[batch, model_dim]` each, or a Transformer's empty key/value caches."""
    if config.is_transformer:
        return transformer.transformer_initial_state(model, config, batch_size, length)
    return {block: [tf.zeros([batch_size, config.model_dim],
                             model.get_layer(block).compute_dtype)] * 2
            for block in _blocks(config) if block != "middle"}


def language_model_step(model: keras.Model, config: LanguageModelConfig, ids: tf.Tensor,
                        state: RecurrentState):
    """One position of `model` at inference: the next-token logits and the new state.

    The same computation as `model(...)[:, t]` given the state after positions `< t`,
    at the cost of one position. Rows whose id is padding (0) keep their state, as the
    model's masking does.

    Args:
        ids: int32 `[batch]`, each sequence's token at this position.
        state: the state after the previous positions (`initial_state` at the start).

    Returns:
        float32 logits `[batch, vocab]` and the new state.
    """
    if config.is_transformer:
        return transformer.transformer_step(model, config, ids, state)
    real = (ids != 0)[:, None]
    new_state = {}

    def lstm_step(layer: keras.layers.LSTM, x):
        output, (h, c) = layer.cell(x, state[layer.name], training=False)
        new_state[layer.name] = [tf.where(real, h, state[layer.name][0]),
                                 tf.where(real, c, state[layer.name][1])]
        return output

    # A new tensor, without the padding mask Keras attaches (which the cells refuse).
    x = tf.identity(model.get_layer("embedding")(ids))
    x = _inference_blocks(model, config, x, lstm_step)
    return model.get_layer("softmax")(x), new_state


def packed_hidden_states(model: keras.Model, config: LanguageModelConfig,
                         packed: PackedSequences) -> tf.Tensor:
    """What the softmax reads at the real positions of packed ids, for the LSTM models.

    The same values as `model`'s softmax input at `packed.indices` of the padded batch,
    without computing the padding: each LSTM steps only the rows still running, the
    MoE and the other layers see the real positions only.

    Args:
        packed: `pack_sequences` of int32 `[batch, time]` right-padded ids.

    Returns:
        `[positions, model_dim]`, in `packed`'s order.
    """
    _check_packable(config, "packed_hidden_states")
    x = tf.identity(model.get_layer("embedding")(packed.values))
    return _inference_blocks(
        model, config, x,
        lambda layer, x: packed_lstm(layer, x, packed.batch_sizes))


def packed_last_logits_and_state(model: keras.Model, config: LanguageModelConfig,
                                 packed: PackedSequences, batch_size):
    """The LSTM models after reading packed ids: each row's next-token logits after its
    last position `[batch, vocab]`, and the state there, as `language_model_step` leaves
    them after stepping through the row's ids; the softmax runs at those positions only.

    Args:
        packed: `pack_sequences` of int32 `[batch, time]` right-padded ids, every row at
            least one id long.
        batch_size: the padded batch's rows; the outputs are in its order.
    """
    _check_packable(config, "packed_last_logits_and_state")
    last = tf.math.unsorted_segment_max(  # each row's last position; time-major packing
        tf.range(tf.shape(packed.indices)[0]), packed.indices[:, 0], batch_size)
    state = {}

    def run_lstm(layer: keras.layers.LSTM, x):
        outputs, cell_states = packed_lstm(layer, x, packed.batch_sizes,
                                           return_cell_states=True)
        state[layer.name] = [tf.gather(outputs, last), tf.gather(cell_states, last)]
        return outputs

    x = tf.identity(model.get_layer("embedding")(packed.values))
    x = _inference_blocks(model, config, x, run_lstm)
    return model.get_layer("softmax")(tf.gather(x, last)), state


def _check_packable(config: LanguageModelConfig, function: str) -> None:
    if config.is_transformer:
        raise ValueError(f"{function} runs the LSTM models; {config.architecture} attends "
                         "over padded sequences.")


def _inference_blocks(model: keras.Model, config: LanguageModelConfig, x, run_lstm):
    """The LSTM models' blocks at inference (dropout off) on embedded positions
    `[..., model_dim]`: each block's output added to x, an LSTM's computed by
    `run_lstm(layer, x)`, the middle block's as `build_language_model` wires it."""
    for block in _blocks(config):
        if block == "middle":
            middle = x
            for name in _middle_layer_names(config):
                middle = model.get_layer(name)(middle, training=False)
            x = x + tf.sigmoid(middle)
        else:
            x = x + run_lstm(model.get_layer(block), x)
    return x


def lstm_ops(input_dim: int, units: int) -> int:
    """Multiply-adds per step of an LSTM: four gates over [input, state]."""
    return 4 * units * (input_dim + units)


def ops_per_timestep(config: LanguageModelConfig,
                     sequence_length: Optional[int] = None) -> int:
    """Forward multiply-adds per token, excluding embedding and softmax, as Table 7 counts.

    The gate counts: x W_g over all experts (or over the groups plus the group_k selected
    groups' secondary gates), and x W_noise as much again with noisy gating, as the paper's
    8.6M for MoE-256 does (`MoEConfig.ops_per_token`). A Transformer's count includes its
    attention over the mean causal context of `sequence_length` positions (required for
    the Transformers, see `transformer.transformer_ops`).
    """
    if config.is_transformer:
        if sequence_length is None:
            raise ValueError("ops_per_timestep: a Transformer's count needs the "
                             "sequence_length its attention spans.")
        return transformer.transformer_ops(config, sequence_length)
    d = config.model_dim
    if config.architecture == "4xlstm":
        return 4 * lstm_ops(d, d)
    if config.architecture == "moe":
        middle = config.moe.ops_per_token(d)
    elif config.architecture == "moe-1-wide":
        middle = 2 * d * config.wide_hidden_size
    else:
        w = config.deep_hidden_size
        middle = 2 * d * w + (DEEP_LAYERS - 1) * w * w
    return 2 * lstm_ops(d, d) + middle


def params_excluding_embedding_softmax(model: keras.Model) -> int:
    """Trainable parameters outside the embedding and softmax layers."""
    return sum(int(math.prod(w.shape)) for w in model.trainable_weights
               if not w.path.startswith(("embedding/", "softmax/")))
