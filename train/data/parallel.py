"""Parallel corpora behind the translation binary's `--data` flag, and their pipelines.

Specs:
- `builtin:en-es` (default), `builtin:es-en`: the shipped Bible corpus (train/data/bible),
  line-aligned English and Spanish;
- `builtin:multi`: both directions in one model, each source prefixed with the token of
  its target language (the paper's multilingual model);
- `tsv:PATH`: one pair a line, source TAB target (plain or .gz); `--valid_data` /
  `--test_data` name held-out files of the same form, and without them a stable hash of
  each line sends 5% to valid and 5% to test;
- `tfds:NAME`: a TensorFlow Datasets translation corpus, e.g. `tfds:wmt14_translate/fr-en`,
  translated in the order of its supervised keys (fr -> en there); splits train,
  validation, test.

A direction is a `ParallelCorpus`: its languages and `TextSplits` of unfiltered
(source, target) tf.string pairs. Pairs with an empty or non-UTF-8 side are dropped in
the pipeline and counted (train/data/text.py's helpers take pairs).
"""

import functools
from typing import Dict, List, NamedTuple, Optional

import tensorflow as tf

from models.special_tokens import EOS_ID
from train.data import text

BUILTIN_PAIRS = ("en-es", "es-en", "multi")


class ParallelCorpus(NamedTuple):
    source_language: str
    target_language: str
    splits: text.TextSplits    # datasets of (source, target) tf.string pairs

    @property
    def direction(self) -> str:
        return f"{self.source_language}-{self.target_language}"


def load_parallel_corpora(spec: str, *, valid_data: Optional[str] = None,
                          test_data: Optional[str] = None) -> List[ParallelCorpus]:
    """The translation directions named by a `--data` spec (module docstring): one, or
    for `builtin:multi` both directions of the built-in corpus."""
    text.check_held_out_files_apply(spec, valid_data, test_data, "tsv")
    kind, _, arg = spec.partition(":")
    if kind == "builtin":
        if arg not in BUILTIN_PAIRS:
            raise ValueError(f"--data=builtin:{arg}: the built-in corpus offers "
                             f"{', '.join('builtin:' + p for p in BUILTIN_PAIRS)}.")
        directions = ["en-es", "es-en"] if arg == "multi" else [arg]
        return [_builtin_corpus(*direction.split("-")) for direction in directions]
    if kind == "tsv":
        if not arg:
            raise ValueError("--data=tsv:PATH needs a path.")
        lines = text.file_splits(arg, valid_data=valid_data, test_data=test_data)
        return [ParallelCorpus("source", "target", text.TextSplits(
            *(split.map(_split_tsv_line) for split in lines)))]
    if kind == "tfds":
        return [_tfds_corpus(arg)]
    raise ValueError(f"--data={spec!r}: expected builtin:en-es, builtin:es-en, "
                     f"builtin:multi, tsv:PATH or tfds:NAME.")


def _builtin_corpus(source: str, target: str) -> ParallelCorpus:
    def pairs(split):
        return tf.data.Dataset.zip(*(
            tf.data.TextLineDataset(text.builtin_path(language, split),
                                    compression_type="GZIP")
            for language in (source, target)))

    return ParallelCorpus(source, target, text.TextSplits(*map(pairs, text.SPLITS)))


def _split_tsv_line(line):
    """`source\\ttarget` -> (source, target); a line without a TAB gets an empty target,
    so that cleaning drops (and counts) it."""
    fields = tf.concat([tf.strings.split(line, "\t", maxsplit=1), ["", ""]], axis=0)
    return fields[0], fields[1]


def _tfds_corpus(name: str) -> ParallelCorpus:
    import tensorflow_datasets as tfds  # heavy; only for tfds sources

    keys = tfds.builder(name).info.supervised_keys
    if not keys or len(keys) != 2:
        raise ValueError(f"--data=tfds:{name}: not a translation dataset (it has no "
                         f"(source, target) supervised keys).")
    source, target = keys
    splits = [tfds.load(name, split=split, as_supervised=True, shuffle_files=False)
              for split in ("train", "validation", "test")]
    return ParallelCorpus(source, target, text.TextSplits(*splits))


def source_sequences(pieces: tf.RaggedTensor, *, max_length: Optional[int] = None,
                     language_tokens: Optional[tf.Tensor] = None) -> tf.RaggedTensor:
    """Ragged pieces `[batch, (n)]` -> `[batch, (m)]`: [language token] pieces eos.

    `language_tokens` (int32 `[batch]`) is prepended for a multilingual model; with
    `max_length` the sequence is cut to that many tokens before eos is appended (training
    and perplexity; translation takes the whole sentence).
    """
    if language_tokens is not None:
        pieces = tf.concat([tf.RaggedTensor.from_tensor(language_tokens[:, None]), pieces],
                           axis=1)
    if max_length is not None:
        pieces = pieces[:, :max_length]
    eos = tf.RaggedTensor.from_tensor(tf.fill([pieces.nrows(), 1], EOS_ID))
    return tf.concat([pieces, eos], axis=1)


def pair_ids(pairs: tf.data.Dataset, tokenizer, *, max_length: int,
             language_token: Optional[int] = None) -> tf.data.Dataset:
    """Clean (source, target) pairs -> int32 (source `[<= max_length + 1]`, target
    `[<= max_length + 1]`): the source as `source_sequences` makes it, the target as
    bos pieces eos cut like a language model's sentence (the decoder reads `[:-1]` and
    predicts `[1:]`)."""
    def to_ids(source, target):
        tokens = None if language_token is None else tf.constant([language_token])
        source_ids = source_sequences(tokenizer.tokenize(source[None]),
                                      max_length=max_length, language_tokens=tokens)[0]
        target_ids = text.sentence_sequences(tokenizer.tokenize(target[None]),
                                             max_length=max_length)[0]
        return source_ids, target_ids

    return text.clean_lines(pairs).map(to_ids, num_parallel_calls=tf.data.AUTOTUNE)


def make_datasets(corpora: List[ParallelCorpus], tokenizer, *,
                  language_tokens: Dict[str, int], max_length: int, batch_tokens: int,
                  shuffle_buffer: int, seed: int, length_multiple: int = 1):
    """Batches of (source, target) ids for training (shuffled, repeated, the directions
    alternating) and for the held-out splits (`{"valid": ..., "test": ...}`, every
    direction in turn). A direction whose target language is in `language_tokens` gets
    that token before its sources."""
    def ids(pairs, corpus):
        return pair_ids(pairs, tokenizer, max_length=max_length,
                        language_token=language_tokens.get(corpus.target_language))

    def batches(sequences):
        return text.batch_by_tokens(sequences, batch_tokens=batch_tokens,
                                    max_length=max_length,
                                    length_multiple=length_multiple
                                    ).prefetch(tf.data.AUTOTUNE)

    streams = [ids(corpus.splits.train.shuffle(shuffle_buffer, seed=seed + i,
                                               reshuffle_each_iteration=True).repeat(),
                   corpus)
               for i, corpus in enumerate(corpora)]
    train = streams[0] if len(streams) == 1 else tf.data.Dataset.choose_from_datasets(
        streams, tf.data.Dataset.range(len(streams)).repeat())

    def held_out(name):
        return batches(functools.reduce(tf.data.Dataset.concatenate, [
            ids(getattr(corpus.splits, name), corpus) for corpus in corpora]))

    return batches(train), {name: held_out(name) for name in ("valid", "test")}
