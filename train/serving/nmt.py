"""A translation model with its tokenizer and beam search, as a SavedModel of raw strings.

Signature `serving_default`:
- one language pair: `(text: tf.string [batch])` -> `translation` tf.string `[batch]`;
- multilingual: `(text: tf.string [batch], target_language: tf.string [batch])` ->
  `translation`; each sentence goes into its own target language (e.g. "en", "es"), and a
  language the model does not know fails the call with a message listing the known ones.
Decoding is beam search with the beam width and length penalty fixed at export; a
translation ends at end-of-sentence or after 2 * (source pieces) + 10 tokens. Sources are
not cut. Loading needs `import tensorflow_text` (its ops tokenize) and nothing of this
project.
"""

from typing import Sequence

import tensorflow as tf

from models.beam_search import beam_search
from models.special_tokens import EOS_ID, PAD_ID
from models.translator import Translator
from train.data.parallel import source_sequences
from train.data.tokenizer import SubwordTokenizer
from train.serving.export import save_atomically

TEXT = tf.TensorSpec([None], tf.string, name="text")
TARGET_LANGUAGE = tf.TensorSpec([None], tf.string, name="target_language")
# Longest translation, in subword pieces: MAX_LENGTH_RATIO * source pieces + slack.
MAX_LENGTH_RATIO = 2
MAX_LENGTH_SLACK = 10


class TranslationServer(tf.Module):
    """`translate` is the serving function; `target_languages` lists, for a multilingual
    model, the languages of its language tokens in id order (empty for one pair)."""

    def __init__(self, model: Translator, tokenizer: SubwordTokenizer, *, beam_width: int,
                 length_penalty: float, target_languages: Sequence[str] = ()):
        super().__init__(name="translation_server")
        if len(target_languages) != model.config.num_language_tokens:
            raise ValueError(f"The model has {model.config.num_language_tokens} language "
                             f"tokens; got target languages {list(target_languages)}.")
        self.model = model
        self.tokenizer = tokenizer
        self.beam_width = beam_width
        self.length_penalty = length_penalty
        self.target_languages = list(target_languages)
        if self.target_languages:
            self.translate = tf.function(self._translate,
                                         input_signature=[TEXT, TARGET_LANGUAGE])
        else:
            self.translate = tf.function(lambda text: self._translate(text, None),
                                         input_signature=[TEXT])

    def _language_tokens(self, target_language):
        """tf.string `[batch]` -> int32 `[batch]` ids of the language tokens."""
        known = tf.constant(self.target_languages)
        matches = tf.equal(target_language[:, None], known[None, :])
        tf.debugging.assert_equal(
            tf.reduce_any(matches, axis=1), True,
            message=f"target_language must be one of {', '.join(self.target_languages)}")
        return self.model.config.vocab_size + tf.argmax(
            tf.cast(matches, tf.int32), axis=1, output_type=tf.int32)

    def _translate(self, text, target_language):
        # An empty batch would give the encoder a source of no time steps.
        return {"translation": tf.cond(
            tf.size(text) > 0, lambda: self._translate_batch(text, target_language),
            lambda: tf.zeros([0], tf.string))}

    def _translate_batch(self, text, target_language):
        pieces = self.tokenizer.tokenize(text)
        tokens = (None if target_language is None
                  else self._language_tokens(target_language))
        source = source_sequences(pieces, language_tokens=tokens).to_tensor(PAD_ID)
        max_lengths = (MAX_LENGTH_RATIO * tf.cast(pieces.row_lengths(), tf.int32)
                       + MAX_LENGTH_SLACK)
        ids, _ = beam_search(self.model, source, beam_width=self.beam_width,
                             length_penalty_alpha=self.length_penalty,
                             max_lengths=max_lengths)
        pieces_out = tf.ragged.boolean_mask(
            ids, tf.logical_and(ids != PAD_ID, ids != EOS_ID))
        return self.tokenizer.detokenize(pieces_out)

    def save(self, path: str) -> None:
        """Writes the SavedModel to `path` (atomically, see `save_atomically`)."""
        save_atomically(self, path, signatures={
            "serving_default": self.translate.get_concrete_function()})
