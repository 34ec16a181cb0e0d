"""A training run's set-up from the common flags (`train.training.flags`), as the
binaries' `main` uses it once absl has parsed them into FLAGS."""

import dataclasses
import functools
import os
import sys
from typing import Dict

import keras
import tensorflow as tf
from absl import flags, logging

from train import distribution
from train.data.tokenizer import load_or_train
from train.training import loop, optimizer, run_config
from train.training.flags import usage_errors

FLAGS = flags.FLAGS


def set_up_placement(tiny_preset: Dict) -> distribution.Placement:
    """Applies `--preset=tiny` (the binary's `tiny_preset`), then the devices and the
    `--strategy`; must run before anything else touches TensorFlow."""
    if FLAGS.preset == "tiny":
        _apply_preset(tiny_preset)
    distribution.configure_cpu_devices(FLAGS.num_cpu_devices)
    with usage_errors():
        return distribution.make_placement(FLAGS.strategy, mesh=FLAGS.mesh,
                                           jit_compile=FLAGS.jit_compile)


def _apply_preset(preset_values: Dict) -> None:
    """Sets each flag of a preset that was not given on the command line."""
    for name, value in preset_values.items():
        if not FLAGS[name].present:
            FLAGS[name].value = value


def check_run_config(model_config, *, is_chief: bool) -> None:
    """`run_config.check_run_config` for the model's config, the data flags and the
    optimizer; a run recorded by an earlier version is read as
    `run_config.upgrade_run_config` reads it."""
    run_config.check_run_config(FLAGS.model_dir, {
        "model": dataclasses.asdict(model_config), "data": FLAGS.data,
        "valid_data": FLAGS.valid_data, "test_data": FLAGS.test_data,
        "max_length": FLAGS.max_length, "seed": FLAGS.seed,
        "optimizer": FLAGS.optimizer}, write=is_chief,
        upgrade=functools.partial(run_config.upgrade_run_config, type(model_config)))


def load_or_train_tokenizer(model_config, vocabulary_lines, *, is_chief: bool):
    """The run's subword tokenizer (see `train.data.tokenizer.load_or_train`) and the
    model config with its vocab_size set to what the corpus supports."""
    tokenizer = load_or_train(FLAGS.model_dir, vocabulary_lines,
                              vocab_size=FLAGS.vocab_size, save=is_chief)
    if tokenizer.vocab_size != model_config.vocab_size:
        logging.info("The corpus supports %d subwords (asked for %d).",
                     tokenizer.vocab_size, model_config.vocab_size)
        model_config = dataclasses.replace(model_config, vocab_size=tokenizer.vocab_size)
    return tokenizer, model_config


def set_up_determinism(seed: int) -> None:
    """Seeds Python, NumPy and TensorFlow and asks TF for deterministic kernels."""
    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


def make_optimizer(constant_steps: int = 0) -> keras.optimizers.Optimizer:
    """The --optimizer with the paper's schedule (`optimizer.make_optimizer`) from the
    learning-rate flags; `constant_steps` at the peak."""
    return optimizer.make_optimizer(
        FLAGS.optimizer, learning_rate=FLAGS.learning_rate,
        warmup_steps=FLAGS.warmup_steps, constant_steps=constant_steps,
        clip_norm=FLAGS.clip_norm)


def make_trainer(**trainer_arguments) -> loop.Trainer:
    """A `Trainer` with the loop flags; its placement errors become usage errors."""
    config = loop.LoopConfig(model_dir=FLAGS.model_dir, train_steps=FLAGS.train_steps,
                             eval_every=FLAGS.eval_every, log_every=FLAGS.log_every,
                             checkpoint_every=FLAGS.checkpoint_every,
                             max_eval_batches=FLAGS.max_eval_batches)
    with usage_errors():  # e.g. a model the --strategy cannot place
        return loop.Trainer(config=config, **trainer_arguments)


def train(trainer: loop.Trainer, extra_metrics: Dict) -> Dict:
    """`trainer.train`; a run stopped by SIGTERM or SIGINT (its step checkpointed) exits
    with the signal's shell status (143, 130)."""
    try:
        return trainer.train(extra_metrics=extra_metrics)
    except loop.StoppedBySignal as stop:
        sys.exit(stop.exit_status)


def export_dir() -> str:
    """Where the SavedModel goes: --export_dir, by default MODEL_DIR/export ("": none)."""
    if FLAGS.export_dir is None:
        return os.path.join(FLAGS.model_dir, "export")
    return FLAGS.export_dir
