"""Trains a language model of the paper (or a baseline) and exports it for serving.

    python -m train.lm --model_dir=/tmp/lm            # MoE LM on the built-in English
    python -m train.lm --model=4xlstm --model_dir=/tmp/lm_4xlstm
    python -m train.lm --model=transformer-moe --gating=switch --k=1 --model_dir=/tmp/tm
    python -m train.lm --preset=tiny --model_dir=/tmp/smoke

Restarting with the same flags resumes from the latest checkpoint in --model_dir.
"""

from train.cli import quiet_tensorflow

quiet_tensorflow()  # before this binary first imports TensorFlow

import tensorflow as tf
from absl import app, flags, logging

from models.lm import (ARCHITECTURES, LanguageModelConfig, build_language_model,
                       ops_per_timestep, params_excluding_embedding_softmax)
from train.data import text
from train.serving.lm import LanguageModelServer
from train.training import flags as training_flags
from train.training import from_flags
from train.training.losses import masked_nll_sums

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """The common training flags and this binary's own, in `flag_values`; `run` defines
    them in absl's FLAGS (importing this module defines nothing)."""
    training_flags.define_common_flags(default_data="builtin:en", flag_values=flag_values)
    flags.DEFINE_enum("model", "moe", list(ARCHITECTURES),
                      "Architecture: the paper's (Table 7), or a decoder-only Transformer "
                      "with dense FFNs or an MoE in every second block.",
                      flag_values=flag_values)
    flags.DEFINE_integer("model_dim", 128, "Embedding, LSTM and Transformer width.",
                         flag_values=flag_values)
    flags.DEFINE_integer("num_layers", 4, "--model=transformer*: blocks.",
                         flag_values=flag_values)
    flags.DEFINE_integer("num_heads", 4, "--model=transformer*: attention heads.",
                         flag_values=flag_values)
    flags.DEFINE_integer("vocab_lines", 200_000,
                         "Training lines the subword vocabulary is learnt from (the "
                         "built-in corpus has 27,648).", flag_values=flag_values)
    training_flags.require_at_least(1, ("model_dim", "vocab_lines", "num_layers",
                                        "num_heads"), flag_values)


TINY_PRESET = dict(model_dim=32, num_experts=4, k=2, hidden_size=32, vocab_size=512,
                   max_length=24, batch_tokens=512, train_steps=20, warmup_steps=5,
                   eval_every=0, log_every=5, checkpoint_every=10, max_eval_batches=4,
                   shuffle_buffer=1000, vocab_lines=5000)


def model_config(flag_values: flags.FlagValues = FLAGS) -> LanguageModelConfig:
    """The model of the flags (parsed in `flag_values`)."""
    return LanguageModelConfig(
        architecture=flag_values.model, vocab_size=flag_values.vocab_size,
        model_dim=flag_values.model_dim,
        moe=training_flags.moe_config_from_flags(flag_values),
        dropout=flag_values.dropout, num_layers=flag_values.num_layers,
        num_heads=flag_values.num_heads)


def lm_loss(model, batch, training):
    """Mean next-token NLL over real (non-padding) targets, with its sum and count."""
    return masked_nll_sums(model(batch[:, :-1], training=training), batch[:, 1:])


def make_datasets(splits: text.TextSplits, tokenizer):
    def batches(lines):
        return text.batch_by_tokens(
            text.sentence_ids(lines, tokenizer, max_length=FLAGS.max_length),
            batch_tokens=FLAGS.batch_tokens, max_length=FLAGS.max_length,
            length_multiple=FLAGS.length_multiple)

    train = batches(splits.train.shuffle(FLAGS.shuffle_buffer, seed=FLAGS.seed,
                                         reshuffle_each_iteration=True).repeat())
    return (train.prefetch(tf.data.AUTOTUNE),
            {name: batches(getattr(splits, name)).prefetch(tf.data.AUTOTUNE)
             for name in ("valid", "test")})


def main(argv):
    del argv
    placement = from_flags.set_up_placement(TINY_PRESET)
    is_chief = placement.is_chief
    with training_flags.usage_errors():
        config = model_config()
        splits = text.load_text_splits(FLAGS.data, valid_data=FLAGS.valid_data,
                                       test_data=FLAGS.test_data)
        from_flags.check_run_config(config, is_chief=is_chief)
    from_flags.set_up_determinism(FLAGS.seed)
    skipped = {name: text.count_invalid_lines(getattr(splits, name))
               for name in ("train", "valid", "test")}
    if any(skipped.values()):
        logging.warning("Skipping invalid (empty or non-UTF-8) lines: %s", skipped)

    tokenizer = from_flags.load_or_train_tokenizer(
        lambda: text.first_clean_lines(splits.train, FLAGS.vocab_lines), is_chief=is_chief)
    from_flags.record_run_config(config, is_chief=is_chief)
    config = from_flags.with_vocabulary(config, tokenizer)

    with placement.scope():
        model = build_language_model(config)
        optimizer = from_flags.make_optimizer()
    params = params_excluding_embedding_softmax(model)
    ops = ops_per_timestep(config, sequence_length=FLAGS.max_length)
    logging.info("%s: %d params excluding embedding and softmax, %d ops/timestep; %s",
                 model.name, params, ops, placement.describe())
    train_data, eval_data = make_datasets(splits, tokenizer)
    trainer = from_flags.make_trainer(
        model=model, optimizer=optimizer, loss_fn=lm_loss, placement=placement,
        train_data=train_data, eval_data=eval_data)
    metrics = from_flags.train(trainer, {
        "model": FLAGS.model, "params_excluding_embedding_softmax": params,
        "ops_per_timestep": ops, "vocab_size": tokenizer.vocab_size,
        "skipped_lines": skipped})
    logging.info("test perplexity %.2f", metrics["test_perplexity"])
    print(f"test perplexity: {metrics['test_perplexity']:.2f}")

    path = from_flags.export_dir()
    if path and is_chief:
        from_flags.prepare_export(model)
        LanguageModelServer(model, config, tokenizer, FLAGS.max_length).save(path)
        print(f"SavedModel: {path}")


def run(argv=None):
    """Entry point of `python -m train.lm` and of the console script `moe-train-lm`:
    defines the flags, then parses `argv` (default: sys.argv) and runs `main`."""
    define_flags()
    app.run(main, argv=argv)


if __name__ == "__main__":
    run()
