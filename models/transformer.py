"""The decoder-only (MoE) Transformer language model, beside the paper's LSTM models.

token embedding * sqrt(d) + sinusoidal positions -> dropout -> `num_layers` pre-LayerNorm
blocks -> LayerNorm -> softmax. A block is x + Dropout(Attention(LN(x))), then
x + Dropout(FFN(LN(x))), the attention causal and multi-head. The FFN is a dense
d -> k * hidden_size (ReLU) -> d network, or, in every second block of the
`transformer-moe` architecture (as GShard and the Switch Transformer place them), a
`SparselyGatedMoE` of k experts of `hidden_size` per token: the same multiply-adds per
token, apart from the gate.

Generation reads one position at a time (`transformer_step`) with a key/value cache: the
keys and values of the positions read so far, so that a new token costs one position.
"""

import dataclasses
import math
from typing import TYPE_CHECKING, Dict, List, Optional

import keras
import tensorflow as tf

from moe_tf import MoEConfig, PhiloxDropout, SparselyGatedMoE

if TYPE_CHECKING:
    from models.lm import LanguageModelConfig

TRANSFORMER_ARCHITECTURES = ("transformer", "transformer-moe")


@keras.saving.register_keras_serializable(package="moe_tf")
class PositionalEncoding(keras.layers.Layer):
    """Token embeddings `[batch, time, d]` * sqrt(d) + the sinusoidal encoding of their
    positions (Vaswani et al. 2017). No weights, so any length; keeps the padding mask."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, inputs, *, positions=None):
        """positions: int32 `[batch, time]`; default 0, 1, ... for every row."""
        if positions is None:
            positions = tf.range(tf.shape(inputs)[-2])[None, :]
        return (inputs * math.sqrt(inputs.shape[-1])
                + tf.cast(sinusoid(positions, inputs.shape[-1]), inputs.dtype))

    def compute_mask(self, inputs, mask=None):
        return mask


def sinusoid(positions: tf.Tensor, dim: int) -> tf.Tensor:
    """float32 `[..., dim]`: sin over the first half, cos over the second, of position /
    10000^(2i / dim)."""
    half = dim // 2
    rates = tf.pow(10000.0, -tf.range(half, dtype=tf.float32) / half)
    angles = tf.cast(positions, tf.float32)[..., None] * rates
    encoding = tf.concat([tf.sin(angles), tf.cos(angles)], axis=-1)
    return tf.pad(encoding, [[0, 0]] * positions.shape.rank + [[0, dim - 2 * half]])


# A block's cache for `transformer_step`: "key" and "value" `[batch, length, heads,
# head_dim]`, the positions read so far (`length` slots allocated up front).
KeyValueCache = Dict[str, tf.Tensor]


@keras.saving.register_keras_serializable(package="moe_tf")
class CausalSelfAttention(keras.layers.Layer):
    """Multi-head causal self-attention, `[batch, time, d]` -> `[batch, time, d]`.

    Scores and their softmax are computed in float32 under mixed precision.
    Weights: `qkv` (d -> 3 d) and `output` (d -> d) Dense layers.
    """

    def __init__(self, *, num_heads: int, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.supports_masking = True

    def build(self, input_shape):
        dim = input_shape[-1]
        if dim % self.num_heads:
            raise ValueError(f"CausalSelfAttention: the width {dim} must be divisible by "
                             f"num_heads ({self.num_heads}).")
        self.head_dim = dim // self.num_heads
        self.qkv = keras.layers.Dense(3 * dim, dtype=self.dtype_policy, name="qkv")
        self.qkv.build(input_shape)
        self.output_projection = keras.layers.Dense(dim, dtype=self.dtype_policy,
                                                    name="output")
        self.output_projection.build(input_shape)

    def _heads(self, x):
        """`[..., d]` -> query, key, value `[..., heads, head_dim]` each."""
        qkv = tf.reshape(self.qkv(x), tf.concat(
            [tf.shape(x)[:-1], [3, self.num_heads, self.head_dim]], axis=0))
        return tf.unstack(qkv, axis=-3)

    def _attend(self, scores, values, equation, allowed):
        """softmax over the allowed keys of the scaled float32 scores, applied to
        `values` by `equation`."""
        scores = tf.cast(scores, tf.float32) / math.sqrt(self.head_dim)
        weights = tf.nn.softmax(tf.where(allowed, scores, -1e9), axis=-1)
        return tf.einsum(equation, tf.cast(weights, values.dtype), values)

    def call(self, inputs, *, mask=None):
        """inputs: `[batch, time, d]`; padding (right of the real tokens) needs no mask:
        no real position attends to a later one."""
        del mask
        query, key, value = self._heads(inputs)
        time = tf.shape(inputs)[1]
        causal = tf.range(time)[:, None] >= tf.range(time)[None, :]       # [q, k]
        context = self._attend(tf.einsum("bqhe,bkhe->bhqk", query, key), value,
                               "bhqk,bkhe->bqhe", causal)
        return self.output_projection(tf.reshape(context, tf.shape(inputs)))

    def step(self, inputs, cache: KeyValueCache, slot, readable):
        """One position per row: `inputs` `[batch, d]` is written to cache slot `slot`
        and attends to the slots where `readable` `[batch, length]` (this one included).

        Returns:
            `[batch, d]` and the updated cache.
        """
        query, key, value = self._heads(inputs)                 # [batch, heads, head_dim]
        length = tf.shape(cache["key"])[1]
        write = tf.cast(tf.one_hot(slot, length), key.dtype)[None, :, None, None]
        cache = {"key": cache["key"] * (1 - write) + write * key[:, None],
                 "value": cache["value"] * (1 - write) + write * value[:, None]}
        context = self._attend(tf.einsum("bhe,blhe->bhl", query, cache["key"]),
                               cache["value"], "bhl,blhe->bhe", readable[:, None, :])
        return self.output_projection(tf.reshape(context, tf.shape(inputs))), cache

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads}


@keras.saving.register_keras_serializable(package="moe_tf")
class TransformerBlock(keras.layers.Layer):
    """A pre-LayerNorm block, `[batch, time, d]` -> `[batch, time, d]`.

    x + Dropout(CausalSelfAttention(LN(x))), then x + Dropout(FFN(LN(x))): the FFN is a
    `SparselyGatedMoE` of the `moe` settings (masked positions not routed), or with `moe`
    None a dense d -> `hidden_size` (ReLU) -> d network.
    """

    def __init__(self, *, num_heads: int, hidden_size: int, dropout: float = 0.0,
                 moe: Optional[MoEConfig] = None, **kwargs):
        super().__init__(**kwargs)
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.dropout = dropout
        self.moe = moe
        self.supports_masking = True

    def build(self, input_shape):
        dim, policy = input_shape[-1], self.dtype_policy
        self.attention_norm = keras.layers.LayerNormalization(dtype=policy,
                                                              name="attention_norm")
        self.attention = CausalSelfAttention(num_heads=self.num_heads, dtype=policy,
                                             name="attention")
        self.ffn_norm = keras.layers.LayerNormalization(dtype=policy, name="ffn_norm")
        # Attributes, not a list: a checkpoint reaches a layer's sublayers through its
        # attributes only.
        if self.moe is None:
            self.ffn_hidden = keras.layers.Dense(self.hidden_size, activation="relu",
                                                 dtype=policy, name="ffn_hidden")
            self.ffn_output = keras.layers.Dense(dim, dtype=policy, name="ffn_output")
            self.ffn_hidden.build(input_shape)
            self.ffn_output.build(tuple(input_shape[:-1]) + (self.hidden_size,))
        else:
            # Named after the block: the balance statistics are keyed by layer name.
            self.ffn_moe = SparselyGatedMoE(config=self.moe, dtype=policy,
                                            name=f"{self.name}_moe")
            self.ffn_moe.build(input_shape)
        self.residual_dropout = PhiloxDropout(self.dropout, dtype=policy,
                                              name="residual_dropout")
        for layer in (self.attention_norm, self.attention, self.ffn_norm):
            layer.build(input_shape)

    def _feed_forward(self, x, *, training, mask):
        if self.moe is None:
            return self.ffn_output(self.ffn_hidden(x))
        return self.ffn_moe(x, training=training, mask=mask)

    def call(self, inputs, *, training=None, mask=None):
        x = inputs + self.residual_dropout(
            self.attention(self.attention_norm(inputs)), training=training)
        return x + self.residual_dropout(
            self._feed_forward(self.ffn_norm(x), training=training, mask=mask),
            training=training)

    def step(self, inputs, cache: KeyValueCache, slot, readable, real):
        """One position per row at inference (see `CausalSelfAttention.step`); `real`
        bool `[batch]` is False for padding rows, which the MoE does not route."""
        attended, cache = self.attention.step(self.attention_norm(inputs), cache, slot,
                                              readable)
        x = inputs + attended
        return x + self._feed_forward(self.ffn_norm(x), training=False, mask=real), cache

    def compute_mask(self, inputs, mask=None):
        return mask

    def get_config(self):
        config = super().get_config()
        config.update(num_heads=self.num_heads, hidden_size=self.hidden_size,
                      dropout=self.dropout,
                      moe=None if self.moe is None else dataclasses.asdict(self.moe))
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if config.get("moe") is not None:
            config["moe"] = MoEConfig.from_dict(config["moe"])
        return cls(**config)


def block_names(config: "LanguageModelConfig") -> List[str]:
    return [f"block_{i + 1}" for i in range(config.num_layers)]


def _block_moe(config: "LanguageModelConfig", index: int) -> Optional[MoEConfig]:
    """The MoE settings of block `index` (0-based), or None for a dense FFN: every second
    block of `transformer-moe`, starting with the second."""
    if config.architecture == "transformer-moe" and index % 2 == 1:
        return config.moe
    return None


def build_transformer_lm(config: "LanguageModelConfig") -> keras.Model:
    """int32 token ids `[batch, time]` (0 = padding, at the end of a row) -> float32
    logits `[batch, time, vocab]`."""
    ids = keras.Input(shape=(None,), dtype="int32", name="ids")
    x = keras.layers.Embedding(config.vocab_size, config.model_dim, mask_zero=True,
                               name="embedding")(ids)
    x = PositionalEncoding(name="positions")(x)
    x = PhiloxDropout(config.dropout, name="embedding_dropout")(x)
    for index, name in enumerate(block_names(config)):
        x = TransformerBlock(num_heads=config.num_heads,
                             hidden_size=config.wide_hidden_size, dropout=config.dropout,
                             moe=_block_moe(config, index), name=name)(x)
    x = keras.layers.LayerNormalization(name="final_norm")(x)
    logits = keras.layers.Dense(config.vocab_size, name="softmax", dtype="float32")(x)
    return keras.Model(ids, logits, name=f"lm_{config.architecture.replace('-', '_')}")


# The state of `transformer_step`: each block's name -> its KeyValueCache, and
# "position" int32 `[batch]` (each row's next position), "readable" bool `[batch,
# length]` (the slots holding a real token) and "slot" int32 `[]` (the next slot).
TransformerState = Dict[str, object]


def transformer_initial_state(model: keras.Model, config: "LanguageModelConfig",
                              batch_size, length) -> TransformerState:
    """The empty state of `model` for `batch_size` rows and `length` positions."""
    head_dim = config.model_dim // config.num_heads
    dtype = model.get_layer(block_names(config)[0]).compute_dtype
    empty = tf.zeros([batch_size, length, config.num_heads, head_dim], dtype)
    state = {name: {"key": empty, "value": empty} for name in block_names(config)}
    state.update(position=tf.zeros([batch_size], tf.int32),
                 readable=tf.zeros([batch_size, length], tf.bool),
                 slot=tf.constant(0, tf.int32))
    return state


def transformer_step(model: keras.Model, config: "LanguageModelConfig", ids: tf.Tensor,
                     state: TransformerState):
    """One position of `model` at inference: the next-token logits and the new state.

    The same computation as `model(...)[:, t]` given the state after positions `< t`, at
    the cost of one position: the keys and values of earlier positions come from the
    cache. Rows whose id is padding (0) neither advance their position nor become
    readable, so left-padded prompts read as unpadded ones.

    Args:
        ids: int32 `[batch]`, each row's token at this position.
        state: after the previous positions (`transformer_initial_state` at the start).

    Returns:
        float32 logits `[batch, vocab]` and the new state.
    """
    real = ids != 0
    slot = state["slot"]
    readable = state["readable"] | (real[:, None] & (
        tf.range(tf.shape(state["readable"])[1]) == slot)[None, :])
    x = tf.identity(model.get_layer("embedding")(ids))
    x = model.get_layer("positions")(x[:, None], positions=state["position"][:, None])[:, 0]
    new_state = {"position": state["position"] + tf.cast(real, tf.int32),
                 "readable": readable, "slot": slot + 1}
    for name in block_names(config):
        x, new_state[name] = model.get_layer(name).step(x, state[name], slot, readable,
                                                         real)
    x = model.get_layer("final_norm")(x)
    return model.get_layer("softmax")(x), new_state


def transformer_ops(config: "LanguageModelConfig", sequence_length: int) -> int:
    """Forward multiply-adds per token, excluding embedding and softmax (and the
    LayerNorms): per block the q, k, v and output projections (4 d^2), the attention
    itself over the mean causal context of a `sequence_length` sequence (2 d per attended
    position, (sequence_length + 1) / 2 positions), and the FFN: 2 d k hidden_size, plus
    the gate for an MoE block (`MoEConfig.ops_per_token`)."""
    d = config.model_dim
    attention = 4 * d * d + d * (sequence_length + 1)
    total = 0
    for index in range(config.num_layers):
        moe = _block_moe(config, index)
        total += attention + (2 * d * config.wide_hidden_size if moe is None
                              else moe.ops_per_token(d))
    return total
