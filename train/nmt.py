"""Trains the paper's translation model (or its dense baseline), scores BLEU, exports it.

    python -m train.nmt --model_dir=/tmp/nmt                 # MoE model, built-in en->es
    python -m train.nmt --model=dense --model_dir=/tmp/nmt_dense
    python -m train.nmt --data=builtin:multi --model_dir=/tmp/nmt_multi
    python -m train.nmt --preset=tiny --model_dir=/tmp/smoke

Restarting with the same flags resumes from the latest checkpoint in --model_dir.
"""

import functools
import os

from train.cli import quiet_tensorflow

quiet_tensorflow()  # before this binary first imports TensorFlow

import statistics
from typing import Dict, List

import sacrebleu
import tensorflow as tf
from absl import app, flags, logging

from models.translation_config import (ARCHITECTURES, TRANSLATION_MOE, TranslationConfig,
                                       ops_per_timestep)
from models.translator import build_translator, params_excluding_embedding_softmax
from train.data import parallel, text
from train.serving.nmt import TranslationServer
from train.training import flags as training_flags
from train.training import from_flags
from train.training.losses import masked_nll_sums

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """The common training flags, with this binary's defaults, and its own, in
    `flag_values`; `run` defines them in absl's FLAGS (importing this module defines
    nothing)."""
    training_flags.define_common_flags(default_data="builtin:en-es",
                                       flag_values=flag_values)
    _define_model_and_decoding_flags(flag_values)
    # The paper's translation settings (Appendix E), scaled to a budget of 600 steps (about
    # 10 minutes on 2 CPU cores): the MoE settings of TranslationConfig (balancing weights
    # 0.01 / 0.01; the gating by language pairs, below); 2000 warm-up and 8000 constant
    # steps become 60 and 240. Dropout stays at 0.1 instead of 0.4: three epochs of a small
    # corpus barely overfit.
    flag_values.set_default("importance_weight", TRANSLATION_MOE.importance_weight)
    flag_values.set_default("load_weight", TRANSLATION_MOE.load_weight)
    flag_values.set_default("gating", None)
    flag_values["gating"].help = (
        f"MoE gating. Default: {TRANSLATION_MOE.gating} (Appendix F) for one language "
        "pair, top_k for builtin:multi.")
    flag_values.set_default("train_steps", 600)
    flag_values.set_default("warmup_steps", 60)


def _define_model_and_decoding_flags(flag_values: flags.FlagValues) -> None:
    where = dict(flag_values=flag_values)
    flags.DEFINE_enum("model", "moe", list(ARCHITECTURES),
                      "moe, or dense: the MoE layers removed and the LSTMs widened to the "
                      "same ops/timestep.", **where)
    flags.DEFINE_integer("model_dim", 128,
                         "Embedding and residual width (LSTM width of moe).", **where)
    flags.DEFINE_integer("attention_dim", 128, "Width of the attention's tanh projections.",
                         **where)
    flags.DEFINE_integer("dense_lstm_width", 0,
                         "--model=dense: units of every LSTM; 0: as many as match the moe "
                         "model's ops/timestep.", **where)
    flags.DEFINE_integer("constant_steps", 240,
                         "Steps at the peak learning rate after warm-up, before the "
                         "1/sqrt(step) decay.", **where)
    flags.DEFINE_integer("beam_width", 4, "Beam width of translation; 1: greedy.", **where)
    flags.DEFINE_float("length_penalty", 0.6,
                       "alpha of the length normalisation ((5 + |Y|) / 6)^alpha.", **where)
    flags.DEFINE_integer("bleu_sentences", 300,
                         "Test sentences (per direction) translated for BLEU; 0: no BLEU.",
                         **where)
    flags.DEFINE_integer("vocab_pairs", 100_000,
                         "Training pairs (both sides) the subword vocabulary is learnt "
                         "from.", **where)
    flags.register_validator("model_dim", lambda v: v is not None and v >= 2 and v % 2 == 0,
                             message="--model_dim must be even and >= 2 (the bidirectional "
                                     "layer gives half to each direction).", **where)
    training_flags.require_at_least(1, ("attention_dim", "beam_width", "vocab_pairs"),
                                    flag_values)
    training_flags.require_at_least(0, ("constant_steps", "bleu_sentences",
                                        "length_penalty"), flag_values)
    flags.register_validator("num_groups", lambda v: not v,
                             message="--num_groups: the translation model's MoE layers "
                                     "are flat (0).", **where)


TINY_PRESET = dict(model_dim=32, attention_dim=32, num_experts=4, k=2, hidden_size=32,
                   vocab_size=512, max_length=24, batch_tokens=512, train_steps=20,
                   warmup_steps=5, constant_steps=5, eval_every=0, log_every=5,
                   checkpoint_every=10, max_eval_batches=4, shuffle_buffer=1000,
                   beam_width=2, bleu_sentences=8, vocab_pairs=2000)
# Sentences translated at once for BLEU (times the beam width in the decoder's batch).
BLEU_BATCH = 32


def model_config(num_language_tokens: int) -> TranslationConfig:
    gating = FLAGS.gating or ("top_k" if num_language_tokens else TRANSLATION_MOE.gating)
    return TranslationConfig(
        architecture=FLAGS.model, vocab_size=FLAGS.vocab_size,
        num_language_tokens=num_language_tokens, model_dim=FLAGS.model_dim,
        attention_dim=FLAGS.attention_dim,
        moe=training_flags.moe_config_from_flags(gating=gating), dropout=FLAGS.dropout,
        dense_lstm_width=FLAGS.dense_lstm_width)


def translation_loss(model, batch, training):
    """Mean NLL of the real (non-padding) target tokens, with its sum and count."""
    source, target = batch
    return masked_nll_sums(model((source, target[:, :-1]), training=training),
                           target[:, 1:])


def translate_all(server: TranslationServer, sources, target_language):
    """Translations of `sources` (str), decoded in batches of similar length."""
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    translations = [""] * len(sources)
    for start in range(0, len(order), BLEU_BATCH):
        batch = order[start:start + BLEU_BATCH]
        batch_sources = tf.constant([sources[i] for i in batch])
        if target_language is None:
            result = server.translate(batch_sources)
        else:
            result = server.translate(batch_sources,
                                      tf.fill([len(batch)], target_language))
        for i, translation in zip(batch, result["translation"].numpy()):
            translations[i] = translation.decode("utf-8")
    return translations


def bleu_scores(server: TranslationServer, corpora, multilingual: bool, write: bool):
    """Corpus BLEU (sacrebleu, detokenized text) of the first `--bleu_sentences` test
    pairs of each direction; if `write`, the translations go to
    MODEL_DIR/translations.DIR.tsv. Multilingual: `bleu_SRC-TGT` per direction and
    `bleu`, their mean."""
    scores = {}
    for corpus in corpora:
        pairs = text.clean_lines(corpus.splits.test).take(FLAGS.bleu_sentences)
        sources, references = zip(*((s.decode("utf-8"), t.decode("utf-8"))
                                     for s, t in pairs.as_numpy_iterator()))
        translations = translate_all(server, sources, corpus.target_language
                                     if multilingual else None)
        bleu = sacrebleu.corpus_bleu(translations, [list(references)]).score
        logging.info("%s BLEU %.2f on %d test sentences", corpus.direction, bleu,
                     len(sources))
        if write:
            with tf.io.gfile.GFile(os.path.join(
                    FLAGS.model_dir, f"translations.{corpus.direction}.tsv"), "w") as f:
                f.write("".join(f"{s}\t{r}\t{t}\n" for s, r, t in
                                zip(sources, references, translations)))
        scores[f"bleu_{corpus.direction}"] = bleu
    if not multilingual:
        return {"bleu": scores.popitem()[1]}
    return {**scores, "bleu": statistics.mean(scores.values())}


def target_languages_of(corpora: List[parallel.ParallelCorpus]) -> List[str]:
    """The languages of a multilingual model's language tokens, in id order; none for a
    single direction."""
    if len(corpora) == 1:
        return []
    return sorted({corpus.target_language for corpus in corpora})


def count_skipped_pairs(corpora: List[parallel.ParallelCorpus]) -> Dict:
    """{direction: {split: pairs dropped for an empty or non-UTF-8 side}}, logged."""
    skipped = {corpus.direction: {name: text.count_invalid_lines(getattr(corpus.splits,
                                                                         name))
                                  for name in text.SPLITS}
               for corpus in corpora}
    if any(any(counts.values()) for counts in skipped.values()):
        logging.warning("Skipping pairs with an empty or non-UTF-8 side: %s", skipped)
    return skipped


def vocabulary_lines(corpora: List[parallel.ParallelCorpus]):
    """Both sides of the first direction's pairs: builtin:multi's directions share them."""
    pairs = text.first_clean_lines(corpora[0].splits.train, FLAGS.vocab_pairs)
    return [line for pair in pairs for line in pair]


def model_sizes(model, config: TranslationConfig, placement) -> Dict:
    """The model's params (excluding embedding and softmax) and ops/timestep, logged."""
    params = params_excluding_embedding_softmax(model)
    ops = ops_per_timestep(config)
    logging.info("%s: LSTMs %d wide, %d params excluding embedding and softmax, "
                 "%d ops/timestep; %s", model.name, config.lstm_width, params, ops,
                 placement.describe())
    return {"params_excluding_embedding_softmax": params, "ops_per_timestep": ops}


def make_trainer(server: TranslationServer, corpora: List[parallel.ParallelCorpus], *,
                 optimizer, placement):
    """The trainer of `server`'s model on `corpora` (its language tokens are those of
    `server`'s target languages); after training it scores BLEU with `server` unless
    --bleu_sentences=0."""
    model, tokenizer = server.model, server.tokenizer
    language_tokens = {language: model.config.vocab_size + i
                       for i, language in enumerate(server.target_languages)}
    train_data, eval_data = parallel.make_datasets(
        corpora, tokenizer, language_tokens=language_tokens, max_length=FLAGS.max_length,
        batch_tokens=FLAGS.batch_tokens, shuffle_buffer=FLAGS.shuffle_buffer,
        seed=FLAGS.seed, length_multiple=FLAGS.length_multiple)
    multilingual = len(corpora) > 1
    return from_flags.make_trainer(
        model=model, optimizer=optimizer, loss_fn=translation_loss, placement=placement,
        train_data=train_data, eval_data=eval_data,
        final_evaluation=((lambda: bleu_scores(server, corpora, multilingual,
                                               placement.is_chief))
                          if FLAGS.bleu_sentences else None))


def main(argv):
    del argv
    placement = from_flags.set_up_placement(TINY_PRESET)
    is_chief = placement.is_chief
    with training_flags.usage_errors():
        corpora = parallel.load_parallel_corpora(FLAGS.data, valid_data=FLAGS.valid_data,
                                                 test_data=FLAGS.test_data)
        target_languages = target_languages_of(corpora)
        config = model_config(len(target_languages))
        from_flags.check_run_config(config, is_chief=is_chief)
    from_flags.set_up_determinism(FLAGS.seed)
    skipped = count_skipped_pairs(corpora)
    tokenizer = from_flags.load_or_train_tokenizer(
        functools.partial(vocabulary_lines, corpora), is_chief=is_chief)
    from_flags.record_run_config(config, is_chief=is_chief)
    config = from_flags.with_vocabulary(config, tokenizer)

    with placement.scope():
        model = build_translator(config)
        optimizer = from_flags.make_optimizer(constant_steps=FLAGS.constant_steps)
    sizes = model_sizes(model, config, placement)
    server = TranslationServer(model, tokenizer, beam_width=FLAGS.beam_width,
                               length_penalty=FLAGS.length_penalty,
                               target_languages=target_languages)
    trainer = make_trainer(server, corpora, optimizer=optimizer, placement=placement)
    metrics = from_flags.train(trainer, {
        "model": FLAGS.model, "gating": config.moe.gating if config.has_moe else None,
        "lstm_width": config.lstm_width, **sizes, "vocab_size": tokenizer.vocab_size,
        "directions": [c.direction for c in corpora], "beam_width": FLAGS.beam_width,
        "length_penalty": FLAGS.length_penalty, "skipped_lines": skipped})
    print(f"test perplexity: {metrics['test_perplexity']:.2f}")
    if "bleu" in metrics:
        print(f"test BLEU: {metrics['bleu']:.2f}")

    path = from_flags.export_dir()
    if path and is_chief:
        from_flags.prepare_export(model)
        server.save(path)
        print(f"SavedModel: {path}")


def run(argv=None):
    """Entry point of `python -m train.nmt` and of the console script `moe-train-nmt`:
    defines the flags, then parses `argv` (default: sys.argv) and runs `main`."""
    define_flags()
    app.run(main, argv=argv)


if __name__ == "__main__":
    run()
