"""The paper's translation model (Section 5.3, Appendix E): GNMT cut to 3 + 2 LSTM layers.

Encoder: embedding -> bidirectional LSTM -> LSTM -> MoE -> LSTM. Decoder: embedding ->
LSTM -> attention -> MoE -> LSTM -> softmax, where the attention context (queried by the
first decoder layer's output, as in GNMT) is fed to the MoE and the last LSTM. Every LSTM
and MoE is a residual branch with dropout on its output, so the residual stream is
`model_dim` wide throughout; LSTMs wider than that (`lstm_width`) project back down, as the
paper's 2048-unit LSTMs project to 512. The settings, the ops accounting and the dense
baseline's width are in `models.translation_config`; decoding in `models.beam_search`.

One subword vocabulary serves both languages, and one embedding both encoder and decoder.
A multilingual model has `num_language_tokens` extra ids after the subwords: the token of
the target language is prepended to the source.
"""

import dataclasses
import math
from typing import NamedTuple

import keras
import tensorflow as tf

from models.attention import TanhProductAttention
from models.projected_lstm import ProjectedLSTM
from models.special_tokens import PAD_ID
from models.translation_config import TranslationConfig
from moe_tf import PhiloxDropout, SparselyGatedMoE


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
        self.dropouts = {name: PhiloxDropout(config.dropout, name=f"{name}_dropout")
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
        return SparselyGatedMoE(config=self.config.moe, output_size=self.config.model_dim,
                                name=name)

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
        return cls(config=TranslationConfig.from_dict(config.pop("config")), **config)


def build_translator(config: TranslationConfig) -> Translator:
    """A Translator with its weights created."""
    model = Translator(config=config)
    model.build()
    return model


def params_excluding_embedding_softmax(model: Translator) -> int:
    """Trainable parameters outside the (shared) embedding and the softmax."""
    excluded = {id(w) for layer in (model.embedding, model.softmax)
                for w in layer.trainable_weights}
    return sum(int(math.prod(w.shape)) for w in model.trainable_weights
               if id(w) not in excluded)
