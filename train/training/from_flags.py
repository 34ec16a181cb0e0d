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
from train.data.tokenizer import TOKENIZER_FILE, SubwordTokenizer
from train.serving.export import quantize_experts
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
    """Checks, before anything is written, that the output directories can be written
    (--model_dir, and --export_dir on the chief) and that --model_dir holds this run or
    none (`run_config.check_run_config`; a run recorded by an earlier version is read as
    `run_config.upgrade_run_config` reads it). `record_run_config` writes it later."""
    if is_chief:
        check_writable("model_dir", FLAGS.model_dir)
        if export_dir():
            check_writable("export_dir", export_dir())
    run_config.check_run_config(FLAGS.model_dir, _run_config(model_config), write=False,
                                upgrade=_upgrade(model_config))


def record_run_config(model_config, *, is_chief: bool) -> None:
    """Records the run's configuration in --model_dir (the chief), once the set-up has
    passed every check (a refused run leaves nothing that a corrected one would
    trip over)."""
    run_config.check_run_config(FLAGS.model_dir, _run_config(model_config),
                                write=is_chief, upgrade=_upgrade(model_config))


def _run_config(model_config) -> Dict:
    """The model's config, the data flags and the optimizer."""
    return {"model": dataclasses.asdict(model_config), "data": FLAGS.data,
            "valid_data": FLAGS.valid_data, "test_data": FLAGS.test_data,
            "max_length": FLAGS.max_length, "seed": FLAGS.seed,
            "optimizer": FLAGS.optimizer}


def _upgrade(model_config):
    return functools.partial(run_config.upgrade_run_config, type(model_config))


def check_writable(flag: str, directory: str) -> None:
    """Raises ValueError naming `--flag` if `directory` cannot be created or written by
    this process (checked without writing; a remote file system, `scheme://...`, is
    left to its first write)."""
    if "://" in directory:
        return
    existing = os.path.abspath(directory)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise ValueError(f"--{flag}={directory} cannot be created: {existing} is a file.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--{flag}={directory} cannot be written: {existing} is not "
                         f"writable by this user.")


def load_or_train_tokenizer(vocabulary_lines, *, is_chief: bool) -> SubwordTokenizer:
    """The run's subword tokenizer: read from --model_dir when the run has one, else
    learnt from `vocabulary_lines()` (the valid training lines) and saved there by the
    chief. Learning is deterministic, so processes of one run that do not write get the
    same vocabulary. A corpus that cannot give --vocab_size subwords is refused, with
    how many lines were valid."""
    path = os.path.join(FLAGS.model_dir, TOKENIZER_FILE)
    if tf.io.gfile.exists(path):
        return SubwordTokenizer.load(path)
    with usage_errors():
        tokenizer = _learn_vocabulary(list(vocabulary_lines()))
    if is_chief:
        tf.io.gfile.makedirs(FLAGS.model_dir)
        tokenizer.save(path)
    return tokenizer


def with_vocabulary(model_config, tokenizer: SubwordTokenizer):
    """The model config with the tokenizer's vocab_size (smaller than --vocab_size in a
    run learnt before fewer subwords were refused)."""
    if tokenizer.vocab_size == model_config.vocab_size:
        return model_config
    logging.info("The run's vocabulary has %d subwords (asked for %d).",
                 tokenizer.vocab_size, model_config.vocab_size)
    return dataclasses.replace(model_config, vocab_size=tokenizer.vocab_size)


def _learn_vocabulary(lines) -> SubwordTokenizer:
    """A vocabulary of --vocab_size subwords from `lines`; ValueError if they cannot
    give it."""
    if not lines:
        raise ValueError(f"--data={FLAGS.data}: no valid training line (the lines are "
                         f"empty or not well-formed UTF-8).")
    try:
        tokenizer = SubwordTokenizer.train(lines, vocab_size=FLAGS.vocab_size)
    except ValueError as error:
        raise ValueError(f"--data={FLAGS.data} with --vocab_size={FLAGS.vocab_size}: "
                         f"{error}") from None
    if tokenizer.vocab_size < FLAGS.vocab_size:
        raise ValueError(
            f"--data={FLAGS.data}: its {len(lines):,} valid training lines give "
            f"{tokenizer.vocab_size} subwords, fewer than --vocab_size={FLAGS.vocab_size}. "
            f"Give more text or a --vocab_size of at most {tokenizer.vocab_size}.")
    return tokenizer


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
                             max_eval_batches=FLAGS.max_eval_batches,
                             nan_policy=FLAGS.nan_policy,
                             max_consecutive_skips=FLAGS.max_consecutive_skips)
    with usage_errors():  # e.g. a model the --strategy cannot place
        return loop.Trainer(config=config, **trainer_arguments)


def train(trainer: loop.Trainer, extra_metrics: Dict) -> Dict:
    """`trainer.train`; a run stopped early exits with its one-line reason and a non-zero
    status: the signal's shell status (143, 130) after SIGTERM or SIGINT (its step
    checkpointed), 1 after a fault (a non-finite step, a checkpoint that cannot be
    written or read)."""
    try:
        return trainer.train(extra_metrics=extra_metrics)
    except loop.StoppedBySignal as stop:
        sys.exit(stop.exit_status)
    except loop.RunStopped as stop:
        logging.error("%s", stop)
        sys.exit(stop.exit_status)


def export_dir() -> str:
    """Where the SavedModel goes: --export_dir, by default MODEL_DIR/export ("": none)."""
    if FLAGS.export_dir is None:
        return os.path.join(FLAGS.model_dir, "export")
    return FLAGS.export_dir


def prepare_export(model: keras.Model) -> None:
    """Readies the trained `model` for its export: its experts' kernels stored as
    --export_expert_dtype asks."""
    quantize_experts(model, FLAGS.export_expert_dtype)
