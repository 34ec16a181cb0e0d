"""Flags and set-up shared by the training binaries."""

import contextlib
import dataclasses
import os
from typing import Dict

import keras
import tensorflow as tf
from absl import app, flags, logging

from train import distribution
from train import loop
from train.schedules import WarmupInverseSqrt
from train.tokenizer import load_or_train

FLAGS = flags.FLAGS


def define_common_flags(*, default_data: str) -> None:
    """Flags of every training binary (data, MoE, optimisation, run directory)."""
    flags.DEFINE_string("data", default_data, "Training data spec (see README).")
    flags.DEFINE_string("valid_data", None, "Held-out file for --data=text:PATH.")
    flags.DEFINE_string("test_data", None, "Test file for --data=text:PATH.")
    flags.DEFINE_string("model_dir", "/tmp/moe_tf_run",
                        "Checkpoints, summaries, vocabulary and metrics.json go here.")
    flags.DEFINE_string("export_dir", None,
                        "Where to write the SavedModel at the end (default: "
                        "MODEL_DIR/export). Empty string: no export.")
    flags.DEFINE_enum("preset", None, ["tiny"],
                      "A very small model and run for tests and smoke runs; explicit "
                      "flags still win.")
    flags.DEFINE_integer("num_experts", 32, "Experts in each MoE layer.")
    flags.DEFINE_integer("k", 4, "Experts per token (per group when hierarchical).")
    flags.DEFINE_integer("num_groups", 0, "Groups of a hierarchical MoE; 0 for flat.")
    flags.DEFINE_integer("hidden_size", 256, "Hidden width of each expert.")
    flags.DEFINE_boolean("noisy_gating", True, "Trained gating noise (Eq. 4).")
    flags.DEFINE_float("importance_weight", 0.1, "w_importance.")
    flags.DEFINE_float("load_weight", 0.1, "w_load.")
    flags.DEFINE_enum("dispatch", "sparse", ["sparse", "capacity"],
                      "MoE dispatch: sparse (dropless) or capacity (fixed-size expert "
                      "buffers; needed by --strategy=dtensor).")
    flags.DEFINE_float("capacity_factor", None,
                       "Expert buffer size as a multiple of the even share, with "
                       "--dispatch=capacity (default 2.0; num_experts / k drops nothing).")
    flags.DEFINE_integer("capacity_group_size", None,
                         "With --dispatch=capacity, route the tokens in groups of this "
                         "many, each with its own expert buffers (GShard); default: the "
                         "batch is one group. Not with --strategy=dtensor.")
    flags.DEFINE_float("dropout", 0.1, "Dropout on every layer's output.")
    flags.DEFINE_integer("vocab_size", 8192, "Subword vocabulary size.")
    flags.DEFINE_integer("max_length", 64, "Subword pieces per sentence kept.")
    flags.DEFINE_integer("batch_tokens", 4096, "Target tokens per batch.")
    flags.DEFINE_integer("train_steps", 900, "Total optimizer steps.")
    flags.DEFINE_float("learning_rate", 2e-3, "Peak learning rate.")
    flags.DEFINE_integer("warmup_steps", 200, "Linear warm-up steps.")
    flags.DEFINE_float("clip_norm", 1.0, "Global gradient-norm clip; 0 for none.")
    flags.DEFINE_integer("eval_every", 300, "Held-out evaluation period; 0: at the end.")
    flags.DEFINE_integer("max_eval_batches", 0, "Limit on held-out batches; 0: all.")
    flags.DEFINE_integer("log_every", 50, "Progress line and summaries period.")
    flags.DEFINE_integer("checkpoint_every", 100, "Checkpoint period.")
    flags.DEFINE_integer("shuffle_buffer", 10000, "Lines in the shuffle buffer.")
    flags.DEFINE_integer("seed", 0, "Seed of initialisation, shuffling, noise, dropout.")
    flags.DEFINE_enum("strategy", "default", list(distribution.STRATEGIES),
                      "default: one device; mirrored: data parallel over local devices; "
                      "multi_worker: data parallel over TF_CONFIG's workers; dtensor: "
                      "batch and experts split over the --mesh.")
    flags.DEFINE_string("mesh", None,
                        "DTensor mesh for --strategy=dtensor, e.g. batch:2,expert:2 (the "
                        "product must be the number of devices).")
    flags.DEFINE_integer("num_cpu_devices", 1,
                         "Split the CPU into this many logical devices (to try the "
                         "strategies on one machine).")

    for name in ("num_experts", "k", "hidden_size", "vocab_size", "max_length",
                 "batch_tokens", "train_steps", "log_every", "checkpoint_every",
                 "shuffle_buffer", "num_cpu_devices"):
        flags.register_validator(name, lambda v: v is not None and v >= 1,
                                 message=f"--{name} must be >= 1.")
    for name in ("num_groups", "warmup_steps", "eval_every", "max_eval_batches"):
        flags.register_validator(name, lambda v: v is not None and v >= 0,
                                 message=f"--{name} must be >= 0.")
    flags.register_validator("capacity_factor", lambda v: v is None or v > 0,
                             message="--capacity_factor must be > 0.")
    flags.register_validator("capacity_group_size", lambda v: v is None or v >= 1,
                             message="--capacity_group_size must be >= 1.")
    for name in ("capacity_factor", "capacity_group_size"):
        flags.register_multi_flags_validator(
            [name, "dispatch"],
            lambda v, name=name: v[name] is None or v["dispatch"] == "capacity",
            message=f"--{name} needs --dispatch=capacity.")
    flags.register_multi_flags_validator(
        ["capacity_group_size", "strategy"],
        lambda v: v["capacity_group_size"] is None or v["strategy"] != "dtensor",
        message="--capacity_group_size does not work with --strategy=dtensor (DTensor "
                "routes the batch as one group).")
    flags.register_multi_flags_validator(
        ["strategy", "dispatch", "mesh"],
        lambda v: v["strategy"] != "dtensor" or (v["dispatch"] == "capacity"
                                                 and v["mesh"]),
        message="--strategy=dtensor needs --mesh (e.g. batch:2,expert:2) and "
                "--dispatch=capacity (the experts run on fixed-size buffers that DTensor "
                "moves between devices).")
    for name in ("importance_weight", "load_weight", "clip_norm"):
        flags.register_validator(name, lambda v: v is not None and v >= 0,
                                 message=f"--{name} must be >= 0.")
    flags.register_validator("learning_rate", lambda v: v is not None and v > 0,
                             message="--learning_rate must be > 0.")
    flags.register_validator("dropout", lambda v: v is not None and 0 <= v < 1,
                             message="--dropout must be in [0, 1).")
    flags.register_multi_flags_validator(
        ["num_experts", "k", "num_groups"], _check_moe_shape,
        message="--k must be <= --num_experts (and <= --num_experts / --num_groups and "
                "<= --num_groups when hierarchical); --num_experts must be divisible by "
                "--num_groups.")


def _check_moe_shape(values: Dict) -> bool:
    experts, k, groups = values["num_experts"], values["k"], values["num_groups"]
    if None in (experts, k, groups):
        return True  # the single-flag validators report these
    if not groups:
        return k <= experts
    return experts % groups == 0 and k <= experts // groups and k <= groups


@contextlib.contextmanager
def usage_errors():
    """Turns the ValueErrors of set-up checks into a usage message, not a traceback."""
    try:
        yield
    except ValueError as error:
        raise app.UsageError(str(error)) from None


def apply_preset(preset_values: Dict) -> None:
    """Sets each flag of a preset that was not given on the command line."""
    for name, value in preset_values.items():
        if not FLAGS[name].present:
            FLAGS[name].value = value


def set_up_placement(tiny_preset: Dict) -> distribution.Placement:
    """Applies `--preset=tiny` (the binary's `tiny_preset`), then the devices and the
    `--strategy`; must run before anything else touches TensorFlow."""
    if FLAGS.preset == "tiny":
        apply_preset(tiny_preset)
    distribution.configure_cpu_devices(FLAGS.num_cpu_devices)
    with usage_errors():
        return distribution.make_placement(FLAGS.strategy, mesh=FLAGS.mesh)


def check_run_config(model_config, *, is_chief: bool) -> None:
    """`train.loop.check_run_config` for the model's config and the data flags."""
    loop.check_run_config(FLAGS.model_dir, {
        "model": dataclasses.asdict(model_config), "data": FLAGS.data,
        "valid_data": FLAGS.valid_data, "test_data": FLAGS.test_data,
        "max_length": FLAGS.max_length, "seed": FLAGS.seed}, write=is_chief)


def load_or_train_tokenizer(model_config, vocabulary_lines, *, is_chief: bool):
    """The run's subword tokenizer (see `train.tokenizer.load_or_train`) and the model
    config with its vocab_size set to what the corpus supports."""
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


def make_optimizer() -> keras.optimizers.Optimizer:
    """Adam with the paper's warm-up then 1/sqrt(step) decay."""
    schedule = WarmupInverseSqrt(FLAGS.learning_rate, warmup_steps=FLAGS.warmup_steps)
    return keras.optimizers.Adam(learning_rate=schedule,
                                 global_clipnorm=FLAGS.clip_norm or None)


def make_trainer(**trainer_arguments):
    """A `Trainer` with the loop flags; its placement errors become usage errors."""
    config = loop.LoopConfig(model_dir=FLAGS.model_dir, train_steps=FLAGS.train_steps,
                             eval_every=FLAGS.eval_every, log_every=FLAGS.log_every,
                             checkpoint_every=FLAGS.checkpoint_every,
                             max_eval_batches=FLAGS.max_eval_batches)
    with usage_errors():  # e.g. a model the --strategy cannot place
        return loop.Trainer(config=config, **trainer_arguments)


def export_dir() -> str:
    if FLAGS.export_dir is None:
        return os.path.join(FLAGS.model_dir, "export")
    return FLAGS.export_dir


def save_atomically(module: tf.Module, path: str, signatures) -> None:
    """Writes a SavedModel beside `path`, then swaps it in (no half-written export)."""
    tmp = path.rstrip("/") + ".tmp"
    if tf.io.gfile.exists(tmp):
        tf.io.gfile.rmtree(tmp)
    tf.saved_model.save(module, tmp, signatures=signatures)
    if tf.io.gfile.exists(path):
        tf.io.gfile.rmtree(path)
    tf.io.gfile.rename(tmp, path)
