"""A subword vocabulary learnt on the training split, applied with tensorflow-text ops.

The SentencePiece trainer (PyPI `sentencepiece`) learns the model once per run; the
serialized model is stored in the run's directory and tokenization itself runs in the
TensorFlow graph (`tensorflow_text.SentencepieceTokenizer`), so input pipelines and
SavedModels take raw strings.
"""

import io
import re
from typing import Iterable, Optional

import tensorflow as tf
import tensorflow_text as tf_text

from models.special_tokens import BOS_ID, EOS_ID, PAD_ID, UNK_ID

TOKENIZER_FILE = "subword.model"


_SPECIAL_IDS = (PAD_ID, UNK_ID, BOS_ID, EOS_ID)


def _too_small_vocabulary(vocab_size: int, needed) -> ValueError:
    return ValueError(
        f"a vocabulary of {vocab_size} subwords is too small for these lines: they need "
        f"at least {needed} (a subword for each distinct character, and the "
        f"{len(_SPECIAL_IDS)} special ids).")


def _pieces_needed(error: RuntimeError) -> Optional[str]:
    """The pieces SentencePiece needed when it refused a too small vocabulary (its text
    is a C++ check's: "... required_chars. <asked> vs <needed>. ..."); else None."""
    needed = re.search(r"smaller than required_chars\. \d+ vs (\d+)", str(error))
    return None if needed is None else needed[1]


class SubwordTokenizer(tf.Module):
    """SentencePiece subwords with fixed special ids: pad 0, unk 1, bos 2, eos 3."""

    def __init__(self, model_proto: bytes, name: str = "subword_tokenizer"):
        super().__init__(name=name)
        self.model_proto = model_proto
        self.tokenizer = tf_text.SentencepieceTokenizer(model=model_proto)

    @classmethod
    def train(cls, lines: Iterable[str], *, vocab_size: int,
              model_type: str = "unigram") -> "SubwordTokenizer":
        """Learns a vocabulary of at most `vocab_size` pieces from `lines`.

        Raises:
            ValueError: `vocab_size` is below what the lines need: a piece for each of
                their distinct characters (all are kept) and the 4 special ids.
        """
        import sentencepiece  # only needed to learn a vocabulary, not to use one

        if vocab_size <= len(_SPECIAL_IDS):
            # SentencePiece would fail placing a special id beyond the vocabulary.
            raise _too_small_vocabulary(vocab_size, f"{len(_SPECIAL_IDS) + 1}")
        model = io.BytesIO()
        try:
            sentencepiece.SentencePieceTrainer.train(
                sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
                model_type=model_type, pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID,
                eos_id=EOS_ID, character_coverage=1.0, num_threads=2,
                # A small corpus may not support the requested size: the caller sees
                # how many pieces it got (train.training.from_flags refuses fewer).
                hard_vocab_limit=False, minloglevel=2)
        except RuntimeError as error:
            needed = _pieces_needed(error)
            if needed is None:
                raise
            raise _too_small_vocabulary(vocab_size, needed) from None
        return cls(model.getvalue())

    @classmethod
    def load(cls, path: str) -> "SubwordTokenizer":
        with tf.io.gfile.GFile(path, "rb") as f:
            return cls(f.read())

    def save(self, path: str) -> None:
        """Writes the model atomically (a temporary file renamed into place)."""
        tmp = path + ".tmp"
        with tf.io.gfile.GFile(tmp, "wb") as f:
            f.write(self.model_proto)
        tf.io.gfile.rename(tmp, path, overwrite=True)

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size())

    def tokenize(self, text: tf.Tensor) -> tf.RaggedTensor:
        """tf.string `[batch]` -> int32 ragged `[batch, (pieces)]` (no bos / eos)."""
        return tf.cast(self.tokenizer.tokenize(text), tf.int32)

    def detokenize(self, ids) -> tf.Tensor:
        """int ragged or dense `[batch, (pieces)]` -> tf.string `[batch]`."""
        return self.tokenizer.detokenize(ids)
