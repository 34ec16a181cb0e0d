"""A language model with its tokenizer, as a SavedModel that takes raw sentences.

Signatures:
- `serving_default(text: tf.string [batch])` ->
  - `log_prob` float32 `[batch]`: the sum of the sentence's token log-probabilities,
    end-of-sentence included;
  - `num_tokens` int32 `[batch]`: the tokens scored, pieces + end-of-sentence, at most
    `max_length`, exactly as in training;
  - `truncated` bool `[batch]`: the sentence had more pieces than `max_length` allows; it
    was cut and scored without its end-of-sentence (training cuts it the same way);
  - `valid_utf8` bool `[batch]`: False for bytes that are not well-formed UTF-8, which
    training skips: such a sentence is not scored (`log_prob` NaN, `num_tokens` 0).
  An empty batch gives empty outputs.
- `generate(prompt: tf.string [batch], max_new_tokens: int32 [], temperature: float32
  [], seed: int32 [])` -> `text` tf.string `[batch]`, a sampled continuation of each
  prompt, and `num_tokens` int32 `[batch]`, the tokens drawn for it (its end-of-sentence
  included). The model's state is carried from token to token (the LSTMs' recurrent
  state, or a Transformer's key/value cache), so each new token costs one position of the
  model, not a rerun of the prefix.
Loading needs `import tensorflow_text` (its ops tokenize) and nothing of this project.
"""

import keras
import tensorflow as tf

from models.lm import (LanguageModelConfig, initial_state, language_model_step,
                       packed_hidden_states, packed_last_logits_and_state)
from models.packed_sequences import pack_sequences
from models.special_tokens import BOS_ID, EOS_ID
from train.data.text import sentence_sequences
from train.data.tokenizer import SubwordTokenizer
from train.serving.export import save_atomically


class LanguageModelServer(tf.Module):
    """`model` (built by `build_language_model(config)`) with its tokenizer, for export."""

    def __init__(self, model: keras.Model, config: LanguageModelConfig,
                 tokenizer: SubwordTokenizer, max_length: int):
        super().__init__(name="language_model_server")
        self.model = model
        self.config = config
        # The model up to its softmax layer, for the models scored padded: scoring
        # computes the logits of the real positions only.
        self.hidden_states = (None if self.packs else
                              keras.Model(model.input, model.get_layer("softmax").input))
        self.tokenizer = tokenizer
        self.max_length = max_length

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def score(self, text):
        count = tf.shape(text)[0]
        # One placeholder row makes an empty batch a batch of one (the LSTMs cannot run
        # on none); the outputs are cut back to `count` rows.
        text = tf.concat([text, [""]], axis=0)[:tf.maximum(count, 1)]
        valid = tf.equal(tf.strings.unicode_transcode(text, "UTF-8", "UTF-8",
                                                      errors="replace"), text)
        pieces = self.tokenizer.tokenize(text)
        sequences = sentence_sequences(pieces, max_length=self.max_length).to_tensor(0)
        inputs, targets = sequences[:, :-1], sequences[:, 1:]
        states, real = self.real_position_states(inputs, targets)
        logits = self.model.get_layer("softmax")(states)
        # -log p(target): cheaper than sparse_softmax_cross_entropy_with_logits, which
        # also writes its gradient, a [tokens, vocab] tensor.
        nll = (tf.reduce_logsumexp(logits, axis=-1)
               - tf.gather(logits, tf.gather_nd(targets, real), batch_dims=1))  # [tokens]
        rows = tf.shape(text)[0]
        log_prob = -tf.math.unsorted_segment_sum(nll, real[:, 0], rows)
        num_tokens = tf.math.unsorted_segment_sum(tf.ones_like(nll, tf.int32), real[:, 0],
                                                  rows)
        return {"log_prob": tf.where(valid, log_prob, float("nan"))[:count],
                "num_tokens": tf.where(valid, num_tokens, 0)[:count],
                "truncated": (pieces.row_lengths() + 1 > self.max_length)[:count],
                "valid_utf8": valid[:count]}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="prompt"),
                                  tf.TensorSpec([], tf.int32, name="max_new_tokens"),
                                  tf.TensorSpec([], tf.float32, name="temperature"),
                                  tf.TensorSpec([], tf.int32, name="seed")])
    def generate(self, prompt, max_new_tokens, temperature, seed):
        logits, state = self.read_prompts(
            tf.concat([tf.fill([tf.shape(prompt)[0], 1], BOS_ID),
                       self.tokenizer.tokenize(prompt)], axis=1), max_new_tokens)
        new_ids = generate_ids(
            lambda ids, state: language_model_step(self.model, self.config, ids, state),
            logits, state, max_new_tokens, temperature, seed)
        return {"text": self.tokenizer.detokenize(
                    tf.ragged.boolean_mask(new_ids, new_ids > EOS_ID)),  # no special ids
                "num_tokens": tf.reduce_sum(tf.cast(new_ids != 0, tf.int32), axis=1)}

    def real_position_states(self, inputs, targets):
        """int32 `[batch, time]` inputs and their targets (right-padded) -> what the
        softmax reads where a target is real `[tokens, model_dim]`, and those positions'
        (row, step) `[tokens, 2]`.

        The LSTM models run packed (`packed_hidden_states`: no step of padding, about
        half of a batch of mixed lengths), which hands the MoE the same tokens in another
        order; the Transformers, and an MoE whose drops depend on that order (the capacity
        dispatch), run on the padded batch, as in training."""
        if not self.packs:
            real = tf.where(targets != 0)
            return tf.gather_nd(self.hidden_states(inputs, training=False), real), real
        # A shorter row's last input is its end-of-sentence, which predicts nothing.
        packed = pack_sequences(tf.where(targets != 0, inputs, 0))
        return packed_hidden_states(self.model, self.config, packed), packed.indices

    @property
    def packs(self) -> bool:
        """Whether the model runs packed sequences (`models.packed_sequences`): the LSTM
        models, unless their MoE's outputs depend on the order of a call's tokens (the
        capacity dispatch's drops)."""
        return not (self.config.is_transformer or self.config.moe.depends_on_token_order)

    def read_prompts(self, ids: tf.RaggedTensor, max_new_tokens=0):
        """int32 ragged `[batch, (n)]`, each row at least one id -> each row's next-token
        logits after its last id `[batch, vocab]`, and the state there, with room for
        `max_new_tokens` more positions.

        A model that packs reads every row's ids at once (its LSTMs step, the rest runs
        once, the softmax at the last ids only); the others step through them position
        by position, left-padded: padding keeps the state, so every row ends at the
        same position."""
        batch = ids.nrows(out_type=tf.int32)
        if self.packs:
            return packed_last_logits_and_state(
                self.model, self.config, pack_sequences(ids.to_tensor(0)), batch)
        ids = left_padded(ids)

        def read(t, logits, state):
            logits, state = language_model_step(self.model, self.config, ids[:, t], state)
            return t + 1, logits, state

        _, logits, state = tf.while_loop(
            lambda t, *_: t < tf.shape(ids)[1], read,
            (0, tf.zeros([batch, self.config.vocab_size]),
             initial_state(self.model, self.config, batch,
                           tf.shape(ids)[1] + max_new_tokens)))
        return logits, state

    def save(self, path: str) -> None:
        """Writes the SavedModel to `path` (atomically, see `save_atomically`)."""
        save_atomically(self, path, signatures={
            "serving_default": self.score.get_concrete_function(),
            "generate": self.generate.get_concrete_function()})


def sample_next(logits, temperature, seed, position):
    """int32 `[batch]`: a token drawn from each row of `logits` `[batch, vocab]` at
    `temperature` (about greedy near 0), the same for the same seed and position."""
    return tf.random.stateless_categorical(
        logits / tf.maximum(temperature, 1e-4), 1, seed=tf.stack([seed, position]),
        dtype=tf.int32)[:, 0]


def generate_ids(step, logits, state, max_new_tokens, temperature, seed):
    """Samples up to `max_new_tokens` tokens per row from `logits` `[batch, vocab]` on:
    `step(ids [batch], state) -> (logits, state)` reads each drawn token. A row ends at
    its end-of-sentence; after it, its ids are padding (0).

    Returns:
        int32 `[batch, max_new_tokens]` (fewer columns if every row ended earlier).
    """
    batch = tf.shape(logits)[0]

    def draw(i, logits, state, ended, drawn):
        ids = tf.where(ended, 0, sample_next(logits, temperature, seed, i))
        logits, state = step(ids, state)
        return i + 1, logits, state, ended | (ids == EOS_ID), drawn.write(i, ids)

    _, _, _, _, drawn = tf.while_loop(
        lambda i, logits, state, ended, drawn: (i < max_new_tokens)
        & ~tf.reduce_all(ended), draw,
        (0, logits, state, tf.zeros([batch], tf.bool),
         tf.TensorArray(tf.int32, size=0, dynamic_size=True, element_shape=[None])))
    # Nothing drawn (no rows, or max_new_tokens 0): a list TensorFlow cannot stack.
    return tf.cond(drawn.size() > 0,
                   lambda: tf.transpose(tf.reshape(drawn.stack(), [-1, batch])),
                   lambda: tf.zeros([batch, 0], tf.int32))


def left_padded(rows: tf.RaggedTensor) -> tf.Tensor:
    """int32 ragged `[batch, (n)]` -> `[batch, max n]`, each row's ids at its end and
    padding (0) before them."""
    dense = rows.to_tensor(0)
    width = tf.shape(dense)[1]
    source = tf.range(width)[None, :] - (width - tf.cast(rows.row_lengths(),
                                                          tf.int32))[:, None]
    return tf.where(source >= 0, tf.gather(dense, tf.maximum(source, 0), batch_dims=1), 0)
