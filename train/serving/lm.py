"""A language model with its tokenizer, as a SavedModel that takes raw sentences.

Signatures:
- `serving_default(text: tf.string [batch])` -> `log_prob` float32 `[batch]` (the sum of
  the sentence's token log-probabilities, end-of-sentence included) and `num_tokens`
  int32 `[batch]` (the tokens scored: pieces + end-of-sentence, at most `max_length`,
  exactly as in training: a longer sentence is cut and scored without end-of-sentence);
- `generate(prompt: tf.string [], max_new_tokens: int32 [], temperature: float32 [],
  seed: int32 [])` -> `text` tf.string `[]`, a sampled continuation.
Loading needs `import tensorflow_text` (its ops tokenize) and nothing of this project.
"""

import keras
import tensorflow as tf

from models.special_tokens import BOS_ID, EOS_ID
from train.data.text import sentence_sequences
from train.data.tokenizer import SubwordTokenizer
from train.serving.export import save_atomically


class LanguageModelServer(tf.Module):

    def __init__(self, model: keras.Model, tokenizer: SubwordTokenizer, max_length: int):
        super().__init__(name="language_model_server")
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    def score(self, text):
        sequences = sentence_sequences(self.tokenizer.tokenize(text),
                                       max_length=self.max_length).to_tensor(0)
        inputs, targets = sequences[:, :-1], sequences[:, 1:]
        log_probs = tf.nn.log_softmax(self.model(inputs, training=False), axis=-1)
        token_log_probs = tf.gather(log_probs, targets, batch_dims=2)
        real = tf.cast(targets != 0, tf.float32)
        return {"log_prob": tf.reduce_sum(token_log_probs * real, axis=-1),
                "num_tokens": tf.cast(tf.reduce_sum(real, axis=-1), tf.int32)}

    @tf.function(input_signature=[tf.TensorSpec([], tf.string, name="prompt"),
                                  tf.TensorSpec([], tf.int32, name="max_new_tokens"),
                                  tf.TensorSpec([], tf.float32, name="temperature"),
                                  tf.TensorSpec([], tf.int32, name="seed")])
    def generate(self, prompt, max_new_tokens, temperature, seed):
        prompt_ids = self.tokenizer.tokenize(prompt[None])[0]
        start = tf.concat([[BOS_ID], prompt_ids], axis=0)[None]        # [1, n]

        def not_done(i, ids):
            return tf.logical_and(i < max_new_tokens, ids[0, -1] != EOS_ID)

        def sample_next(i, ids):
            logits = self.model(ids, training=False)[:, -1]
            next_id = tf.random.stateless_categorical(
                logits / tf.maximum(temperature, 1e-4), 1, seed=tf.stack([seed, i]),
                dtype=tf.int32)
            return i + 1, tf.concat([ids, next_id], axis=1)

        _, ids = tf.while_loop(not_done, sample_next, (0, start),
                               shape_invariants=(tf.TensorShape([]),
                                                 tf.TensorShape([1, None])))
        new_ids = ids[0, tf.shape(start)[1]:]
        new_ids = tf.boolean_mask(new_ids, new_ids > EOS_ID)  # drop the special ids
        return {"text": self.tokenizer.detokenize(new_ids[None])[0]}

    def save(self, path: str) -> None:
        """Writes the SavedModel to `path` (atomically, see `save_atomically`)."""
        save_atomically(self, path, signatures={
            "serving_default": self.score.get_concrete_function(),
            "generate": self.generate.get_concrete_function()})
