"""Text sources behind the `--data` flag, as tf.data pipelines of raw lines.

Specs:
- `builtin:en`, `builtin:es`: the shipped Bible corpus (train/data/bible, see its README);
- `builtin:manuals`: English prose of free software manuals, built on this machine from
  Debian packages (train/data/manuals_corpus.py, `make manuals-corpus`);
- `text:PATH`: a user's corpus, one sentence a line (plain or .gz); `--valid_data` /
  `--test_data` name the held-out files, and without them a stable hash of each line sends
  5% to valid and 5% to test;
- `tfds:NAME`: a TensorFlow Datasets corpus with a `text` feature, e.g. `tfds:lm1b` (the
  paper's 1B-word benchmark): train = train[:99%], valid = train[99%:], test = test.

Invalid UTF-8 and empty lines are dropped inside the pipeline and counted. The helpers
below also take datasets whose elements are tuples of lines (a translation's source and
target, train/data/parallel.py): such an element is kept only if every line of it is valid.
"""

import os
from typing import List, NamedTuple, Optional

import tensorflow as tf

from models.special_tokens import BOS_ID, EOS_ID
from train.data import manuals_corpus

BUILTIN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bible")
BUILTIN_LANGUAGES = ("en", "es")
SPLITS = ("train", "valid", "test")
# Share of lines (in percent) that a single text file gives to valid and test each.
HELD_OUT_PERCENT = 5


class TextSplits(NamedTuple):
    """Unfiltered datasets of the three splits: tf.string lines (or tuples of them)."""

    train: tf.data.Dataset
    valid: tf.data.Dataset
    test: tf.data.Dataset


def is_valid_line(line: tf.Tensor) -> tf.Tensor:
    """True for a line with visible text that is well-formed UTF-8."""
    repaired = tf.strings.unicode_transcode(line, "UTF-8", "UTF-8", errors="replace",
                                            replacement_char=0xFFFD)
    return tf.logical_and(tf.equal(repaired, line),
                          tf.strings.length(tf.strings.strip(line)) > 0)


def _is_valid_element(*lines) -> tf.Tensor:
    """Whether every line of an element is valid (elementwise over a batch of them)."""
    return tf.reduce_all(tf.stack([is_valid_line(line) for line in lines]), axis=0)


def _strip(*lines):
    stripped = tuple(tf.strings.strip(line) for line in lines)
    return stripped if len(stripped) > 1 else stripped[0]


def clean_lines(lines: tf.data.Dataset) -> tf.data.Dataset:
    """Drops elements with an invalid line and strips surrounding white space."""
    return lines.filter(_is_valid_element).map(_strip)


# Elements read at once by the one-pass helpers below (the checks are vectorized).
_READ_BATCH = 4096


def count_invalid_lines(lines: tf.data.Dataset) -> int:
    """How many elements `clean_lines` drops (one pass over the data)."""
    def add_invalid(count, batch):
        valid = _is_valid_element(*tf.nest.flatten(batch))
        return count + tf.reduce_sum(tf.cast(tf.logical_not(valid), tf.int64))

    return int(lines.batch(_READ_BATCH).reduce(tf.constant(0, tf.int64), add_invalid))


def first_clean_lines(lines: tf.data.Dataset, count: int) -> List:
    """The first `count` elements `clean_lines` keeps, decoded: str (or tuples of str)."""
    def keep_valid(*batch):
        valid = _is_valid_element(*batch)
        stripped = tf.nest.flatten(_strip(*batch))
        return tuple(tf.boolean_mask(side, valid) for side in stripped)

    decoded = []
    for batch in lines.batch(_READ_BATCH).map(keep_valid).as_numpy_iterator():
        decoded += [tuple(side.decode("utf-8") for side in element) if len(element) > 1
                    else element[0].decode("utf-8") for element in zip(*batch)]
        if len(decoded) >= count:
            break
    return decoded[:count]


def _text_file(path: str) -> tf.data.Dataset:
    if not tf.io.gfile.exists(path):
        raise ValueError(f"data file not found: {path}")
    if tf.io.gfile.isdir(path):
        raise ValueError(f"data file is a directory: {path}")
    return tf.data.TextLineDataset(path, compression_type="GZIP" if path.endswith(".gz")
                                   else "")


def _hash_split(lines: tf.data.Dataset, split: str) -> tf.data.Dataset:
    """A stable split of one file: the same line always lands in the same split."""
    low, high = {"train": (2 * HELD_OUT_PERCENT, 100),
                 "valid": (0, HELD_OUT_PERCENT),
                 "test": (HELD_OUT_PERCENT, 2 * HELD_OUT_PERCENT)}[split]

    def keep(line):
        bucket = tf.strings.to_hash_bucket_fast(line, 100)
        return tf.logical_and(bucket >= low, bucket < high)

    return lines.filter(keep)


def builtin_path(language: str, split: str) -> str:
    return os.path.join(BUILTIN_DIR, f"{language}.{split}.txt.gz")


def _manuals_splits() -> TextSplits:
    directory = manuals_corpus.DEFAULT_OUTPUT_DIR
    paths = [manuals_corpus.corpus_path(directory, split) for split in SPLITS]
    missing = [path for path in paths if not os.path.exists(path)]
    if missing:
        raise ValueError(f"--data=builtin:manuals: {missing[0]} is missing; build the "
                         f"corpus with `make manuals-corpus` (see docs/training.md).")
    return TextSplits(*(_text_file(path) for path in paths))


def check_held_out_files_apply(spec: str, valid_data: Optional[str],
                               test_data: Optional[str], file_kind: str) -> None:
    """`--valid_data` and `--test_data` name the held-out files of a `file_kind:PATH`
    corpus; the other corpora have held-out splits of their own, which the files would
    silently not replace."""
    for flag, path in (("--valid_data", valid_data), ("--test_data", test_data)):
        if path and not spec.startswith(f"{file_kind}:"):
            raise ValueError(f"{flag} applies to --data={file_kind}:PATH only; "
                             f"--data={spec} has held-out splits of its own.")


def load_text_splits(spec: str, *, valid_data: Optional[str] = None,
                     test_data: Optional[str] = None) -> TextSplits:
    """The raw line datasets named by a `--data` spec (see the module docstring)."""
    check_held_out_files_apply(spec, valid_data, test_data, "text")
    kind, _, arg = spec.partition(":")
    if kind == "builtin":
        if arg == "manuals":
            return _manuals_splits()
        if arg not in BUILTIN_LANGUAGES:
            raise ValueError(f"--data=builtin:{arg}: the built-in corpora are "
                             f"builtin:en, builtin:es and builtin:manuals.")
        return TextSplits(*(_text_file(builtin_path(arg, split)) for split in SPLITS))
    if kind == "text":
        if not arg:
            raise ValueError("--data=text:PATH needs a path.")
        return file_splits(arg, valid_data=valid_data, test_data=test_data)
    if kind == "tfds":
        return _tfds_splits(arg)
    raise ValueError(f"--data={spec!r}: expected builtin:en, builtin:es, builtin:manuals, "
                     f"text:PATH or tfds:NAME.")


def file_splits(path: str, *, valid_data: Optional[str] = None,
                test_data: Optional[str] = None) -> TextSplits:
    """The lines of `path` and of the held-out files, or without those a stable 90 / 5 / 5
    split of `path`'s lines by their hash."""
    train = _text_file(path)
    if (valid_data is None) != (test_data is None):
        raise ValueError("--valid_data and --test_data go together (or neither: then "
                         "held-out lines are split off the --data file).")
    if valid_data is None:
        return TextSplits(*(_hash_split(train, split) for split in SPLITS))
    return TextSplits(train, _text_file(valid_data), _text_file(test_data))


def _tfds_splits(name: str) -> TextSplits:
    import tensorflow_datasets as tfds  # heavy; only for tfds sources

    def text(split):
        return tfds.load(name, split=split, shuffle_files=False).map(
            lambda example: example["text"])

    return TextSplits(text("train[:99%]"), text("train[99%:]"), text("test"))


def sentence_sequences(pieces: tf.RaggedTensor, *, max_length: int) -> tf.RaggedTensor:
    """Ragged pieces `[batch, (n)]` -> `[batch, (<= max_length + 1)]`: bos pieces eos, cut.

    A language model reads `[:-1]` and predicts `[1:]`, so each sentence gives at most
    `max_length` predictions; a longer one is cut there (and keeps no eos).
    """
    markers = tf.ones([pieces.nrows(), 1], tf.int32)
    return tf.concat([tf.RaggedTensor.from_tensor(markers * BOS_ID), pieces,
                      tf.RaggedTensor.from_tensor(markers * EOS_ID)],
                     axis=1)[:, :max_length + 1]


def sentence_ids(lines: tf.data.Dataset, tokenizer, *,
                 max_length: int) -> tf.data.Dataset:
    """Clean lines -> int32 `[length]` sequences (see `sentence_sequences`)."""
    def to_ids(line):
        return sentence_sequences(tokenizer.tokenize(line[None]),
                                  max_length=max_length)[0]

    return clean_lines(lines).map(to_ids, num_parallel_calls=tf.data.AUTOTUNE)


def batch_by_tokens(sequences: tf.data.Dataset, *, batch_tokens: int,
                    max_length: int, length_multiple: int = 1) -> tf.data.Dataset:
    """Pads sequences of similar length together, about `batch_tokens` tokens a batch.

    Elements are int `[length]` sequences, or tuples of them (a translation's source and
    target), bucketed by their longest sequence and padded per component, to a multiple
    of `length_multiple` (fewer batch shapes to compile under XLA or DTensor, and the
    same token layout as the DTensor placement's). Buckets are spaced 8 tokens apart; a
    bucket of sequences up to L long holds batch_tokens // L of them. Padding uses id 0.
    """
    boundaries = list(range(9, max_length + 2, 8))
    batch_sizes = [max(1, batch_tokens // (b - 1)) for b in boundaries]
    batch_sizes.append(max(1, batch_tokens // (max_length + 1)))
    return sequences.bucket_by_sequence_length(
        element_length_func=lambda *seqs: tf.reduce_max(
            tf.stack([tf.shape(seq)[0] for seq in seqs])),
        bucket_boundaries=boundaries, bucket_batch_sizes=batch_sizes,
        padded_shapes=tf.nest.map_structure(lambda _: [None], sequences.element_spec),
        padding_values=0).map(
            lambda *batch: _pad_length_to_multiple(batch, length_multiple))


def _pad_length_to_multiple(batch, multiple: int):
    """Each `[rows, length]` of `batch` (a tuple) padded with 0 to a multiple length."""
    def pad(ids):
        return tf.pad(ids, [[0, 0], [0, -tf.shape(ids)[1] % multiple]])

    padded = tuple(pad(ids) for ids in batch)
    return padded if len(padded) > 1 else padded[0]
