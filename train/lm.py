"""Trains a language model of the paper (or a baseline) and exports it for serving.

    python -m train.lm --model_dir=/tmp/lm            # MoE LM on the built-in English
    python -m train.lm --model=4xlstm --model_dir=/tmp/lm_4xlstm
    python -m train.lm --preset=tiny --model_dir=/tmp/smoke

Restarting with the same flags resumes from the latest checkpoint in --model_dir.
"""

import tensorflow as tf
from absl import app, flags, logging

from models.lm import (ARCHITECTURES, LanguageModelConfig, build_language_model,
                       ops_per_timestep, params_excluding_embedding_softmax)
from train import common, data
from train.losses import masked_nll_sums
from train.lm_serving import LanguageModelServer

FLAGS = flags.FLAGS
common.define_common_flags(default_data="builtin:en")
flags.DEFINE_enum("model", "moe", list(ARCHITECTURES), "Architecture (Table 7).")
flags.DEFINE_integer("model_dim", 128, "Embedding and LSTM width.")
flags.register_validator("model_dim", lambda v: v is not None and v >= 1,
                         message="--model_dim must be >= 1.")

TINY_PRESET = dict(model_dim=32, num_experts=4, k=2, hidden_size=32, vocab_size=512,
                   max_length=24, batch_tokens=512, train_steps=20, warmup_steps=5,
                   eval_every=0, log_every=5, checkpoint_every=10, max_eval_batches=4,
                   shuffle_buffer=1000)
# Lines the vocabulary is learnt from (the whole built-in training split fits).
VOCAB_LINES = 200_000


def model_config() -> LanguageModelConfig:
    return LanguageModelConfig(
        architecture=FLAGS.model, vocab_size=FLAGS.vocab_size, model_dim=FLAGS.model_dim,
        moe=common.moe_config_from_flags(), dropout=FLAGS.dropout)


def lm_loss(model, batch, training):
    """Mean next-token NLL over real (non-padding) targets, with its sum and count."""
    return masked_nll_sums(model(batch[:, :-1], training=training), batch[:, 1:])


def make_datasets(splits: data.TextSplits, tokenizer):
    def batches(lines):
        return data.batch_by_tokens(
            data.sentence_ids(lines, tokenizer, max_length=FLAGS.max_length),
            batch_tokens=FLAGS.batch_tokens, max_length=FLAGS.max_length)

    train = batches(splits.train.shuffle(FLAGS.shuffle_buffer, seed=FLAGS.seed,
                                         reshuffle_each_iteration=True).repeat())
    return (train.prefetch(tf.data.AUTOTUNE),
            {name: batches(getattr(splits, name)).prefetch(tf.data.AUTOTUNE)
             for name in ("valid", "test")})


def main(argv):
    del argv
    placement = common.set_up_placement(TINY_PRESET)
    is_chief = placement.is_chief
    with common.usage_errors():
        config = model_config()
        splits = data.load_text_splits(FLAGS.data, valid_data=FLAGS.valid_data,
                                       test_data=FLAGS.test_data)
        common.check_run_config(config, is_chief=is_chief)
    common.set_up_determinism(FLAGS.seed)
    skipped = {name: data.count_invalid_lines(getattr(splits, name))
               for name in ("train", "valid", "test")}
    if any(skipped.values()):
        logging.warning("Skipping invalid (empty or non-UTF-8) lines: %s", skipped)

    def vocabulary_lines():
        lines = data.clean_lines(splits.train).take(VOCAB_LINES).as_numpy_iterator()
        return (line.decode("utf-8") for line in lines)

    tokenizer, config = common.load_or_train_tokenizer(config, vocabulary_lines,
                                                       is_chief=is_chief)

    with placement.scope():
        model = build_language_model(config)
        optimizer = common.make_optimizer()
    params = params_excluding_embedding_softmax(model)
    ops = ops_per_timestep(config)
    logging.info("%s: %d params excluding embedding and softmax, %d ops/timestep; %s",
                 model.name, params, ops, placement.describe())
    train_data, eval_data = make_datasets(splits, tokenizer)
    trainer = common.make_trainer(
        model=model, optimizer=optimizer, loss_fn=lm_loss, placement=placement,
        train_data=train_data, eval_data=eval_data)
    metrics = trainer.train(extra_metrics={
        "model": FLAGS.model, "params_excluding_embedding_softmax": params,
        "ops_per_timestep": ops, "vocab_size": tokenizer.vocab_size,
        "skipped_lines": skipped})
    logging.info("test perplexity %.2f", metrics["test_perplexity"])
    print(f"test perplexity: {metrics['test_perplexity']:.2f}")

    path = common.export_dir()
    if path and is_chief:
        LanguageModelServer(model, tokenizer, FLAGS.max_length).save(
            path, common.save_atomically)
        print(f"SavedModel: {path}")


def run():
    """Console-script entry point (`moe-train-lm`)."""
    app.run(main)


if __name__ == "__main__":
    run()
