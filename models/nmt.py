"""The paper's translation model (Section 5.3, Appendix E): GNMT cut to 3 + 2 LSTM layers.

Encoder: embedding -> bidirectional LSTM -> LSTM -> MoE -> LSTM. Decoder: embedding ->
LSTM -> attention -> MoE -> LSTM -> softmax, where the attention context (queried by the
first decoder layer's output, as in GNMT) is fed to the MoE and the last LSTM. Every LSTM
and MoE is a residual branch with dropout on its output, so the residual stream is
`model_dim` wide throughout; LSTMs wider than that (`lstm_width`) project back down, as the
paper's 2048-unit LSTMs project to 512.

Architectures:
- `moe`: as above, LSTMs `model_dim` wide;
- `dense`: the same model with its MoE layers removed and every LSTM widened (then
  projected) until the ops per time step match the `moe` model's (`ops_per_timestep`), or
  to `dense_lstm_width`.

One subword vocabulary serves both languages, and one embedding both encoder and decoder.
A multilingual model has `num_language_tokens` extra ids after the subwords: the token of
the target language is prepended to the source.
"""

import dataclasses
import math
from typing import NamedTuple, Optional, Tuple

import keras
import tensorflow as tf

from models.lm import lstm_ops
from models.moe_block import moe_from_config
from moe_tf import SparselyGatedMoE
from train.tokenizer import BOS_ID, EOS_ID, PAD_ID

ARCHITECTURES = ("moe", "dense")
GATINGS = ("top_k", "balanced")
# GNMT's length normalisation, lp(Y) = ((LENGTH_PENALTY_BASE + |Y|) / (BASE + 1))^alpha.
LENGTH_PENALTY_BASE = 5.0
# Widest LSTM the dense model may get, as a multiple of model_dim.
MAX_WIDENING = 16


@dataclasses.dataclass(frozen=True)
class TranslationConfig:
    """Sizes of a translation model. Defaults: the paper's widths divided by 4."""

    architecture: str = "moe"
    vocab_size: int = 8192          # shared subwords (paper: 32k wordpieces)
    num_language_tokens: int = 0    # target-language tokens (multilingual models)
    model_dim: int = 128            # embedding, residual stream (paper: 512 projection)
    attention_dim: int = 128        # width of tanh(x U) and tanh(y W)
    num_experts: int = 32
    k: int = 4
    hidden_size: int = 256          # expert hidden width (paper: 2048)
    gating: str = "balanced"        # Appendix F for one pair; "top_k" for multilingual
    noisy_gating: bool = True       # top_k gating only
    importance_weight: float = 0.01
    load_weight: float = 0.01
    dropout: float = 0.1
    dispatch: str = "sparse"
    dense_lstm_width: int = 0       # dense only: LSTM units; 0: match the moe model's ops
    capacity_factor: Optional[float] = None   # dispatch="capacity" only
    capacity_group_size: Optional[int] = None  # dispatch="capacity" only

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}; got "
                             f"{self.architecture!r}.")
        if self.gating not in GATINGS:
            raise ValueError(f"gating must be one of {GATINGS}; got {self.gating!r}.")
        if self.model_dim < 2 or self.model_dim % 2:
            raise ValueError(f"model_dim must be even (the bidirectional layer gives half "
                             f"to each direction); got {self.model_dim}.")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1); got {self.dropout}.")
        if self.dense_lstm_width and self.has_moe:
            raise ValueError("dense_lstm_width is for the dense model; the moe model's "
                             "LSTMs are model_dim wide.")
        if self.dense_lstm_width < 0 or self.dense_lstm_width % 2:
            raise ValueError(f"dense_lstm_width must be even (the bidirectional layer "
                             f"gives half to each direction) and >= 0; got "
                             f"{self.dense_lstm_width}.")

    @property
    def has_moe(self) -> bool:
        return self.architecture == "moe"

    @property
    def lstm_width(self) -> int:
        """Units of every LSTM: `model_dim`, or for `dense` `dense_lstm_width` if set, else
        the even width whose ops per time step are closest to those of the `moe` model of
        the same config."""
        if self.has_moe:
            return self.model_dim
        if self.dense_lstm_width:
            return self.dense_lstm_width
        target = ops_per_timestep(dataclasses.replace(self, architecture="moe"))
        widths = range(self.model_dim, MAX_WIDENING * self.model_dim + 1, 2)
        return min(widths, key=lambda width: abs(_ops(self, width) - target))


def _lstm_layer_ops(input_dim: int, units: int, output_dim: int,
                    bidirectional: bool = False) -> int:
    recurrent = (2 * lstm_ops(input_dim, units // 2) if bidirectional
                 else lstm_ops(input_dim, units))
    return recurrent + (units * output_dim if units != output_dim else 0)


def _moe_ops(config: TranslationConfig, input_dim: int) -> int:
    """The gate (x W_g, and x W_noise for noisy top-k) and k experts of one token."""
    noisy = config.gating == "top_k" and config.noisy_gating
    gate = input_dim * config.num_experts * (2 if noisy else 1)
    return gate + config.k * config.hidden_size * (input_dim + config.model_dim)


def _ops(config: TranslationConfig, width: int) -> int:
    d, a = config.model_dim, config.attention_dim
    encoder = (_lstm_layer_ops(d, width, d, bidirectional=True)
               + 2 * _lstm_layer_ops(d, width, d)
               + d * a)                                   # keys tanh(x U)
    decoder = (_lstm_layer_ops(d, width, d)
               + d * a + a                                # query tanh(y W), times V
               + _lstm_layer_ops(2 * d, width, d))        # reads [x, context]
    if config.has_moe:
        encoder += _moe_ops(config, d)
        decoder += _moe_ops(config, 2 * d)
    return encoder + decoder


def ops_per_timestep(config: TranslationConfig) -> int:
    """Forward multiply-adds for one source token through the encoder plus one target
    token through the decoder, excluding embedding and softmax (as Table 7 counts).

    The attention's per-token projections count; its per (source, target) position pair
    part (`attention_dim + model_dim` for the score and the context) grows with the source
    length, is the same in both architectures and is left out. MoE layers count the gate
    and k experts (a balanced gate routes each token to k experts on average).
    """
    return _ops(config, config.lstm_width)


def params_excluding_embedding_softmax(model: "Translator") -> int:
    """Trainable parameters outside the (shared) embedding and the softmax."""
    excluded = {id(w) for layer in (model.embedding, model.softmax)
                for w in layer.trainable_weights}
    return sum(int(math.prod(w.shape)) for w in model.trainable_weights
               if id(w) not in excluded)


@keras.saving.register_keras_serializable(package="moe_tf")
class TanhProductAttention(keras.layers.Layer):
    """The paper's attention, A(x_i, y_j) = sum_d V_d tanh((x_i U)_d) tanh((y_j W)_d).

    As matrix products: keys K = tanh(X U) `[batch, source, units]` (once per sentence),
    queries Q = tanh(Y W) * V `[batch, target, units]`, scores Q K^T, a softmax over the
    real (unmasked) source positions, and the context is the weighted sum of X.

    Weights: `U` `[memory_dim, units]`, `W` `[query_dim, units]`, `V` `[units]`.
    """

    def __init__(self, *, units: int, **kwargs):
        super().__init__(**kwargs)
        if units < 1:
            raise ValueError(f"TanhProductAttention: `units` must be >= 1; got {units}.")
        self.units = units

    def build(self, input_shape):
        query_shape, memory_shape = input_shape
        self.U = self.add_weight(name="U", shape=(memory_shape[-1], self.units),
                                 initializer="glorot_uniform")
        self.W = self.add_weight(name="W", shape=(query_shape[-1], self.units),
                                 initializer="glorot_uniform")
        self.V = self.add_weight(name="V", shape=(self.units,),
                                 initializer="glorot_uniform")

    def keys(self, memory):
        """`[batch, source, memory_dim]` -> tanh(X U) `[batch, source, units]`."""
        return tf.tanh(tf.matmul(memory, self.U))

    def attend(self, queries, memory, keys, memory_mask=None, return_weights=False):
        """Context `[batch, target, memory_dim]` (and weights `[batch, target, source]`)
        from queries `[batch, target, query_dim]` and precomputed `keys(memory)`."""
        q = tf.tanh(tf.matmul(queries, self.W)) * self.V
        scores = tf.matmul(q, keys, transpose_b=True)                  # [B, T, S]
        if memory_mask is not None:
            # Padding gets no weight: its score is the lowest the dtype holds.
            scores = tf.where(memory_mask[:, None, :], scores, scores.dtype.min)
        weights = tf.nn.softmax(scores, axis=-1)
        context = tf.matmul(weights, memory)
        return (context, weights) if return_weights else context

    def call(self, inputs, *, memory_mask=None, return_weights=False):
        """inputs: (queries `[batch, target, query_dim]`, memory `[batch, source,
        memory_dim]`); memory_mask: bool `[batch, source]`, False at padding."""
        queries, memory = inputs
        return self.attend(queries, memory, self.keys(memory), memory_mask,
                           return_weights)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


@keras.saving.register_keras_serializable(package="moe_tf")
class ProjectedLSTM(keras.layers.Layer):
    """An LSTM of `units` whose outputs are projected to `output_dim` (no projection when
    they are equal). Bidirectional: `units // 2` per direction, outputs concatenated.

    `call`: `[batch, time, input_dim]` -> `[batch, time, output_dim]`. `step` runs one
    time step of a unidirectional layer, for decoding.
    """

    def __init__(self, *, units: int, output_dim: int, bidirectional: bool = False,
                 **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.output_dim = output_dim
        self.bidirectional = bidirectional
        self.supports_masking = True
        policy = self.dtype_policy
        if bidirectional:
            self.lstm = keras.layers.Bidirectional(
                keras.layers.LSTM(units // 2, return_sequences=True, dtype=policy),
                dtype=policy, name="lstm")
            self.lstm_output_dim = 2 * (units // 2)
        else:
            self.lstm = keras.layers.LSTM(units, return_sequences=True, dtype=policy,
                                          name="lstm")
            self.lstm_output_dim = units
        self.projection = (None if self.lstm_output_dim == output_dim else
                           keras.layers.Dense(output_dim, use_bias=False, dtype=policy,
                                              name="projection"))

    def build(self, input_shape):
        self.lstm.build(input_shape)
        if self.projection is not None:
            self.projection.build(tuple(input_shape[:-1]) + (self.lstm_output_dim,))

    def call(self, inputs, *, training=None, mask=None):
        outputs = self.lstm(inputs, training=training, mask=mask)
        return outputs if self.projection is None else self.projection(outputs)

    def initial_state(self, batch_size):
        """Zero `[h, c]`, each `[batch_size, units]`."""
        return [tf.zeros([batch_size, self.units], self.compute_dtype)] * 2

    def step(self, inputs, state):
        """One step at inference: `[batch, input_dim]`, `[h, c]` -> output, new state."""
        outputs, state = self.lstm.cell(inputs, state, training=False)
        return (outputs if self.projection is None else self.projection(outputs)), state

    def get_config(self):
        return {**super().get_config(), "units": self.units, "output_dim": self.output_dim,
                "bidirectional": self.bidirectional}


class EncoderOutput(NamedTuple):
    memory: tf.Tensor    # [batch, source, model_dim], the top encoder layer
    keys: tf.Tensor      # [batch, source, attention_dim], tanh(memory U)
    mask: tf.Tensor      # bool [batch, source], False at padding


@keras.saving.register_keras_serializable(package="moe_tf")
class Translator(keras.Model):
    """Source ids `[batch, source]` and target inputs `[batch, target]` (bos + pieces; 0 =
    padding) -> float32 logits `[batch, target, vocab_size]` of the next target token.

    `encode`, `initial_decoder_state` and `decode_step` run the same layers one target
    token at a time for `beam_search`.
    """

    def __init__(self, *, config: TranslationConfig, **kwargs):
        kwargs.setdefault("name", f"nmt_{config.architecture}")
        super().__init__(**kwargs)
        self.config = config
        d, width = config.model_dim, config.lstm_width
        self.embedding = keras.layers.Embedding(
            config.vocab_size + config.num_language_tokens, d, name="embedding")
        self.encoder_lstm_1 = ProjectedLSTM(units=width, output_dim=d, bidirectional=True,
                                            name="encoder_lstm_1")
        self.encoder_lstm_2 = ProjectedLSTM(units=width, output_dim=d,
                                            name="encoder_lstm_2")
        self.encoder_lstm_3 = ProjectedLSTM(units=width, output_dim=d,
                                            name="encoder_lstm_3")
        self.decoder_lstm_1 = ProjectedLSTM(units=width, output_dim=d,
                                            name="decoder_lstm_1")
        self.attention = TanhProductAttention(units=config.attention_dim, name="attention")
        self.decoder_lstm_2 = ProjectedLSTM(units=width, output_dim=d,
                                            name="decoder_lstm_2")
        self.encoder_moe = self._moe("encoder_moe") if config.has_moe else None
        self.decoder_moe = self._moe("decoder_moe") if config.has_moe else None
        self.softmax = keras.layers.Dense(config.vocab_size, dtype="float32",
                                          name="softmax")
        branches = ["source_embedding", "target_embedding", "encoder_lstm_1",
                    "encoder_lstm_2", "encoder_lstm_3", "decoder_lstm_1", "decoder_lstm_2"]
        if config.has_moe:
            branches += ["encoder_moe", "decoder_moe"]
        self.dropouts = {name: keras.layers.Dropout(config.dropout, name=f"{name}_dropout")
                         for name in branches}

    def build(self, input_shape=None):
        """Creates every weight; the sizes all follow from the config."""
        d = self.config.model_dim
        stream, with_context = (None, None, d), (None, None, 2 * d)
        self.embedding.build((None, None))
        for layer in (self.encoder_lstm_1, self.encoder_lstm_2, self.encoder_lstm_3,
                      self.decoder_lstm_1, self.encoder_moe, self.softmax):
            if layer is not None:
                layer.build(stream)
        self.attention.build((stream, stream))
        for layer in (self.decoder_moe, self.decoder_lstm_2):
            if layer is not None:
                layer.build(with_context)
        self.built = True

    def _moe(self, name: str) -> SparselyGatedMoE:
        return moe_from_config(self.config, output_size=self.config.model_dim,
                               gating=self.config.gating, name=name)

    def _branch(self, name, x, y, training):
        """The residual add around a layer, with dropout on the layer's output."""
        return x + self.dropouts[name](y, training=training)

    def encode(self, source, *, training=None) -> EncoderOutput:
        mask = tf.not_equal(source, PAD_ID)
        x = self.dropouts["source_embedding"](self.embedding(source), training=training)
        for name in ("encoder_lstm_1", "encoder_lstm_2", "encoder_moe", "encoder_lstm_3"):
            layer = getattr(self, name)
            if layer is not None:
                x = self._branch(name, x, layer(x, training=training, mask=mask), training)
        return EncoderOutput(memory=x, keys=self.attention.keys(x), mask=mask)

    def decode(self, target_inputs, encoded: EncoderOutput, *, training=None):
        """Teacher forcing: logits `[batch, target, vocab]` for every target position."""
        mask = tf.not_equal(target_inputs, PAD_ID)
        y = self.dropouts["target_embedding"](self.embedding(target_inputs),
                                              training=training)
        x = self._branch("decoder_lstm_1", y,
                         self.decoder_lstm_1(y, training=training, mask=mask), training)
        context = self.attention.attend(x, encoded.memory, encoded.keys, encoded.mask)
        if self.decoder_moe is not None:
            x = self._branch("decoder_moe", x, self.decoder_moe(
                tf.concat([x, context], -1), training=training, mask=mask), training)
        x = self._branch("decoder_lstm_2", x, self.decoder_lstm_2(
            tf.concat([x, context], -1), training=training, mask=mask), training)
        return self.softmax(x)

    def call(self, inputs, *, training=None):
        source, target_inputs = inputs
        return self.decode(target_inputs, self.encode(source, training=training),
                           training=training)

    def initial_decoder_state(self, batch_size):
        """The decoder LSTMs' zero `[h, c]` states, `[batch_size, lstm_width]` each."""
        return (self.decoder_lstm_1.initial_state(batch_size),
                self.decoder_lstm_2.initial_state(batch_size))

    def decode_step(self, tokens, state, encoded: EncoderOutput):
        """One target position at inference: int32 `[batch]` previous tokens -> logits
        `[batch, vocab]` and the new state; the same computation as `decode`."""
        y = self.embedding(tokens)
        output, state_1 = self.decoder_lstm_1.step(y, state[0])
        x = y + output
        context = self.attention.attend(x[:, None], encoded.memory, encoded.keys,
                                        encoded.mask)[:, 0]
        if self.decoder_moe is not None:
            x = x + self.decoder_moe(tf.concat([x, context], -1), training=False)
        output, state_2 = self.decoder_lstm_2.step(tf.concat([x, context], -1), state[1])
        return self.softmax(x + output), (state_1, state_2)

    def get_config(self):
        return {"name": self.name, "trainable": self.trainable,
                "config": dataclasses.asdict(self.config)}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        return cls(config=TranslationConfig(**config.pop("config")), **config)


def build_translator(config: TranslationConfig) -> Translator:
    """A Translator with its weights created."""
    model = Translator(config=config)
    model.build()
    return model


def length_penalty(lengths, alpha: float):
    """GNMT's lp(Y) = ((5 + |Y|) / 6)^alpha; scores are log P(Y) / lp(Y)."""
    return tf.pow((LENGTH_PENALTY_BASE + tf.cast(lengths, tf.float32))
                  / (LENGTH_PENALTY_BASE + 1.0), alpha)


def beam_search(model: Translator, source, *, beam_width: int, length_penalty_alpha: float,
                max_lengths) -> Tuple[tf.Tensor, tf.Tensor]:
    """The best translation of each source under log P(Y | X) / lp(Y), by beam search.

    Args:
        model: a Translator.
        source: int32 `[batch, source]`, 0-padded.
        beam_width: hypotheses kept per sentence; 1 is greedy decoding.
        length_penalty_alpha: alpha of `length_penalty`; 0 ranks by log P alone.
        max_lengths: int32 `[batch]`: a hypothesis that reaches this many tokens without
            end-of-sentence ends there.

    Returns:
        ids int32 `[batch, length]` (ending with EOS unless cut, then 0-padded) and their
        scores float32 `[batch]`.

    Each of the `beam_width` slots holds a hypothesis; a finished one (EOS, or its
    sentence's max length) stays in its slot with its score, competing with the
    extensions of the live ones (whose tokens are all ranked together by their scores),
    until every slot has finished. With beam_width 1 this is greedy decoding. Padding and
    begin-of-sentence are never generated.
    """
    batch = tf.shape(source)[0]
    beams = beam_width

    def tile(x):                                   # [B, ...] -> [B * beams, ...]
        return tf.repeat(x, beams, axis=0)

    encoded = tf.nest.map_structure(tile, model.encode(source, training=False))
    max_lengths = tf.cast(max_lengths, tf.int32)
    vocab = model.config.vocab_size
    ids = tf.range(vocab)
    never = tf.logical_or(tf.equal(ids, PAD_ID), tf.equal(ids, BOS_ID))
    # Of a finished slot the only continuation is padding, at no cost.
    finished_row = tf.where(tf.equal(ids, PAD_ID), 0.0, -float("inf"))
    # At the start only the first slot is live, so the first step fills distinct slots.
    log_probs = tf.tile(tf.concat([[0.0], tf.fill([beams - 1], -float("inf"))], 0)[None],
                        [batch, 1])                                          # [B, K]
    initial = (tf.zeros([batch, beams, 0], tf.int32),                        # tokens
               log_probs,
               tf.zeros([batch, beams], tf.int32),                           # lengths
               tf.zeros([batch, beams], tf.bool),                            # finished
               tf.fill([batch * beams], BOS_ID),                             # last tokens
               model.initial_decoder_state(batch * beams))

    def not_done(sequences, log_probs, lengths, finished, last, state):
        return tf.logical_not(tf.reduce_all(finished))

    def step(sequences, log_probs, lengths, finished, last, state):
        logits, state = model.decode_step(last, state, encoded)
        step_log_probs = tf.where(never, -float("inf"), tf.nn.log_softmax(logits))
        step_log_probs = tf.reshape(step_log_probs, [batch, beams, vocab])
        step_log_probs = tf.where(finished[:, :, None], finished_row, step_log_probs)
        candidates = log_probs[:, :, None] + step_log_probs                  # [B, K, V]
        new_lengths = lengths + tf.cast(tf.logical_not(finished), tf.int32)
        scores = candidates / length_penalty(new_lengths, length_penalty_alpha)[:, :, None]
        _, top = tf.math.top_k(tf.reshape(scores, [batch, beams * vocab]), k=beams)
        slot, token = top // vocab, top % vocab                              # [B, K]
        log_probs = tf.gather(tf.reshape(candidates, [batch, beams * vocab]), top,
                              batch_dims=1)
        lengths = tf.gather(new_lengths, slot, batch_dims=1)
        finished = tf.logical_or(tf.gather(finished, slot, batch_dims=1), tf.logical_or(
            tf.equal(token, EOS_ID), lengths >= max_lengths[:, None]))
        # A slot that only -inf candidates could fill is dead: never a result.
        finished = tf.logical_or(finished, tf.math.is_inf(log_probs))
        sequences = tf.concat([tf.gather(sequences, slot, batch_dims=1),
                               token[:, :, None]], axis=2)
        rows = tf.reshape(slot + tf.range(batch)[:, None] * beams, [-1])
        state = tf.nest.map_structure(lambda s: tf.gather(s, rows), state)
        return sequences, log_probs, lengths, finished, tf.reshape(token, [-1]), state

    invariants = (tf.TensorShape([None, beams, None]),) + tuple(
        tf.nest.map_structure(lambda t: tf.TensorShape(t.shape), initial[1:]))
    sequences, log_probs, lengths, _, _, _ = tf.while_loop(
        not_done, step, initial, shape_invariants=invariants)
    scores = log_probs / length_penalty(lengths, length_penalty_alpha)
    best = tf.argmax(scores, axis=1, output_type=tf.int32)
    return (tf.gather(sequences, best, batch_dims=1),
            tf.gather(scores, best, batch_dims=1))
