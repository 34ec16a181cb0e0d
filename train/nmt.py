"""Trains the paper's translation model (or its dense baseline), scores BLEU, exports it.

    python -m train.nmt --model_dir=/tmp/nmt                 # MoE model, built-in en->es
    python -m train.nmt --model=dense --model_dir=/tmp/nmt_dense
    python -m train.nmt --data=builtin:multi --model_dir=/tmp/nmt_multi
    python -m train.nmt --preset=tiny --model_dir=/tmp/smoke

Restarting with the same flags resumes from the latest checkpoint in --model_dir.
"""

import os
import statistics

import sacrebleu
import tensorflow as tf
from absl import app, flags, logging

from models.translation_config import (ARCHITECTURES, TRANSLATION_MOE, TranslationConfig,
                                       ops_per_timestep)
from models.translator import build_translator, params_excluding_embedding_softmax
from train import common, data, nmt_data
from train.losses import masked_nll_sums
from train.nmt_serving import TranslationServer

FLAGS = flags.FLAGS
common.define_common_flags(default_data="builtin:en-es")
flags.DEFINE_enum("model", "moe", list(ARCHITECTURES),
                  "moe, or dense: the MoE layers removed and the LSTMs widened to the "
                  "same ops/timestep.")
flags.DEFINE_integer("model_dim", 128, "Embedding and residual width (LSTM width of moe).")
flags.DEFINE_integer("attention_dim", 128, "Width of the attention's tanh projections.")
flags.DEFINE_integer("dense_lstm_width", 0,
                     "--model=dense: units of every LSTM; 0: as many as match the moe "
                     "model's ops/timestep.")
flags.DEFINE_integer("constant_steps", 240,
                     "Steps at the peak learning rate after warm-up, before the "
                     "1/sqrt(step) decay.")
flags.DEFINE_integer("beam_width", 4, "Beam width of translation; 1: greedy.")
flags.DEFINE_float("length_penalty", 0.6,
                   "alpha of the length normalisation ((5 + |Y|) / 6)^alpha.")
flags.DEFINE_integer("bleu_sentences", 300,
                     "Test sentences (per direction) translated for BLEU; 0: no BLEU.")
flags.DEFINE_integer("vocab_pairs", 100_000,
                     "Training pairs (both sides) the subword vocabulary is learnt from.")
flags.register_validator("model_dim", lambda v: v is not None and v >= 2 and v % 2 == 0,
                         message="--model_dim must be even and >= 2 (the bidirectional "
                                 "layer gives half to each direction).")
for _name in ("attention_dim", "beam_width", "vocab_pairs"):
    flags.register_validator(_name, lambda v: v is not None and v >= 1,
                             message=f"--{_name} must be >= 1.")
for _name in ("constant_steps", "bleu_sentences", "length_penalty"):
    flags.register_validator(_name, lambda v: v is not None and v >= 0,
                             message=f"--{_name} must be >= 0.")
flags.register_validator("num_groups", lambda v: not v,
                         message="--num_groups: the translation model's MoE layers are "
                                 "flat (0).")
# The paper's translation settings (Appendix E), scaled to a budget of 600 steps (about
# 10 minutes on 2 CPU cores): the MoE settings of TranslationConfig (balancing weights
# 0.01 / 0.01; the gating by language pairs, below); 2000 warm-up and 8000 constant steps
# become 60 and 240. Dropout stays at 0.1 instead of 0.4: three epochs of a small corpus
# barely overfit.
FLAGS.set_default("importance_weight", TRANSLATION_MOE.importance_weight)
FLAGS.set_default("load_weight", TRANSLATION_MOE.load_weight)
FLAGS.set_default("gating", None)
FLAGS["gating"].help = (f"MoE gating. Default: {TRANSLATION_MOE.gating} (Appendix F) for "
                        "one language pair, top_k for builtin:multi.")
FLAGS.set_default("train_steps", 600)
FLAGS.set_default("warmup_steps", 60)

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
        attention_dim=FLAGS.attention_dim, moe=common.moe_config_from_flags(gating=gating),
        dropout=FLAGS.dropout, dense_lstm_width=FLAGS.dense_lstm_width)


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
        text = tf.constant([sources[i] for i in batch])
        if target_language is None:
            result = server.translate(text)
        else:
            result = server.translate(text, tf.fill([len(batch)], target_language))
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
        pairs = data.clean_lines(corpus.splits.test).take(FLAGS.bleu_sentences)
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


def main(argv):
    del argv
    placement = common.set_up_placement(TINY_PRESET)
    is_chief = placement.is_chief
    with common.usage_errors():
        corpora = nmt_data.load_parallel_corpora(FLAGS.data, valid_data=FLAGS.valid_data,
                                                 test_data=FLAGS.test_data)
        multilingual = len(corpora) > 1
        target_languages = (sorted({corpus.target_language for corpus in corpora})
                            if multilingual else [])
        config = model_config(len(target_languages))
        common.check_run_config(config, is_chief=is_chief)
    common.set_up_determinism(FLAGS.seed)
    skipped = {corpus.direction: {name: data.count_invalid_lines(getattr(corpus.splits,
                                                                         name))
                                  for name in data.SPLITS}
               for corpus in corpora}
    if any(any(counts.values()) for counts in skipped.values()):
        logging.warning("Skipping pairs with an empty or non-UTF-8 side: %s", skipped)

    def vocabulary_lines():
        # Both sides of the first direction's pairs: builtin:multi's directions share them.
        pairs = data.clean_lines(corpora[0].splits.train).take(FLAGS.vocab_pairs)
        return (line.decode("utf-8") for pair in pairs.as_numpy_iterator()
                for line in pair)

    tokenizer, config = common.load_or_train_tokenizer(config, vocabulary_lines,
                                                       is_chief=is_chief)
    language_tokens = {language: config.vocab_size + i
                       for i, language in enumerate(target_languages)}

    with placement.scope():
        model = build_translator(config)
        optimizer = common.make_optimizer(constant_steps=FLAGS.constant_steps)
    params = params_excluding_embedding_softmax(model)
    ops = ops_per_timestep(config)
    logging.info("%s: LSTMs %d wide, %d params excluding embedding and softmax, "
                 "%d ops/timestep; %s", model.name, config.lstm_width, params, ops,
                 placement.describe())
    server = TranslationServer(model, tokenizer, beam_width=FLAGS.beam_width,
                               length_penalty=FLAGS.length_penalty,
                               target_languages=target_languages)
    train_data, eval_data = nmt_data.make_datasets(
        corpora, tokenizer, language_tokens=language_tokens, max_length=FLAGS.max_length,
        batch_tokens=FLAGS.batch_tokens, shuffle_buffer=FLAGS.shuffle_buffer,
        seed=FLAGS.seed)
    trainer = common.make_trainer(
        model=model, optimizer=optimizer, loss_fn=translation_loss, placement=placement,
        train_data=train_data, eval_data=eval_data,
        final_evaluation=((lambda: bleu_scores(server, corpora, multilingual, is_chief))
                          if FLAGS.bleu_sentences else None))
    metrics = trainer.train(extra_metrics={
        "model": FLAGS.model, "gating": config.moe.gating if config.has_moe else None,
        "lstm_width": config.lstm_width,
        "params_excluding_embedding_softmax": params, "ops_per_timestep": ops,
        "vocab_size": tokenizer.vocab_size, "directions": [c.direction for c in corpora],
        "beam_width": FLAGS.beam_width, "length_penalty": FLAGS.length_penalty,
        "skipped_lines": skipped})
    print(f"test perplexity: {metrics['test_perplexity']:.2f}")
    if "bleu" in metrics:
        print(f"test BLEU: {metrics['bleu']:.2f}")

    path = common.export_dir()
    if path and is_chief:
        server.save(path, common.save_atomically)
        print(f"SavedModel: {path}")


def run():
    """Console-script entry point (`moe-train-nmt`)."""
    app.run(main)


if __name__ == "__main__":
    run()
