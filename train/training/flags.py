"""Flags and set-up shared by the training binaries."""

import contextlib
import dataclasses
import functools
import os
from typing import Dict

import keras
import tensorflow as tf
from absl import app, flags, logging

from moe_tf import GATES, MoEConfig
from moe_tf.config import DEFAULT_CAPACITY_FACTOR, DISPATCHES
from moe_tf.optimizers import FactoredAdam
from train import distribution
from train import loop
from train.schedules import WarmupInverseSqrt
from train.tokenizer import load_or_train

FLAGS = flags.FLAGS
OPTIMIZERS = ("adam", "factored_adam")


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
    define_moe_flags()
    flags.DEFINE_enum("optimizer", "adam", list(OPTIMIZERS),
                      "adam, or factored_adam: Adam without first moment and with a "
                      "factored second moment (Appendix D; moe_tf.optimizers).")
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

    for name in ("vocab_size", "max_length", "batch_tokens", "train_steps", "log_every",
                 "checkpoint_every", "shuffle_buffer", "num_cpu_devices"):
        flags.register_validator(name, lambda v: v is not None and v >= 1,
                                 message=f"--{name} must be >= 1.")
    for name in ("warmup_steps", "eval_every", "max_eval_batches", "clip_norm"):
        flags.register_validator(name, lambda v: v is not None and v >= 0,
                                 message=f"--{name} must be >= 0.")
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
    flags.register_validator("learning_rate", lambda v: v is not None and v > 0,
                             message="--learning_rate must be > 0.")
    flags.register_validator("dropout", lambda v: v is not None and 0 <= v < 1,
                             message="--dropout must be in [0, 1).")


# One flag per MoEConfig setting, of the same name; its default is MoEConfig's (None for
# the settings a gate or the dispatch fills in). MoEConfig checks the values.
_MOE_DEFAULTS = {field.name: field.default for field in dataclasses.fields(MoEConfig)}
MOE_FLAGS = tuple(_MOE_DEFAULTS)
_COMPILED_KERNELS = {"auto": "auto", "true": True, "false": False}


def define_moe_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """The MoE flags (`moe_config_from_flags` reads them) in `flag_values`."""
    default, where = _MOE_DEFAULTS, dict(flag_values=flag_values)
    top_k, balanced = GATES["top_k"].options, GATES["balanced"].options
    flags.DEFINE_integer("num_experts", default["num_experts"], "Experts in each MoE layer.",
                         **where)
    flags.DEFINE_integer("k", default["k"],
                         "Experts per token (per selected group when hierarchical).",
                         **where)
    flags.DEFINE_integer("hidden_size", default["hidden_size"],
                         "Hidden width of each expert.", **where)
    flags.DEFINE_integer("num_groups", default["num_groups"],
                         "Groups of a hierarchical MoE (Appendix B); unset or 0: flat.",
                         **where)
    flags.DEFINE_integer("group_k", default["group_k"],
                         "Groups per token of a hierarchical MoE; default: --k.", **where)
    flags.DEFINE_enum("gating", default["gating"], list(GATES),
                      "MoE gating: top_k (noisy top-k, Eq. 3-5) or balanced (strictly "
                      "balanced, Appendix F).", **where)
    flags.DEFINE_boolean("noisy_gating", default["noisy_gating"],
                         "--gating=top_k: trained gating noise (Eq. 4); default "
                         f"{top_k['noisy_gating']}.", **where)
    flags.DEFINE_float("noise_epsilon", default["noise_epsilon"],
                       "--gating=top_k: floor of the noise scale; default "
                       f"{top_k['noise_epsilon']}.", **where)
    flags.DEFINE_float("threshold_loss_weight", default["threshold_loss_weight"],
                       "--gating=balanced: weight of the threshold loss; default "
                       f"{balanced['threshold_loss_weight']}.", **where)
    flags.DEFINE_float("importance_weight", default["importance_weight"], "w_importance.",
                       **where)
    flags.DEFINE_float("load_weight", default["load_weight"], "w_load.", **where)
    flags.DEFINE_enum("dispatch", default["dispatch"], list(DISPATCHES),
                      "MoE dispatch: sparse (dropless) or capacity (fixed-size expert "
                      "buffers; needed by --strategy=dtensor).", **where)
    flags.DEFINE_float("capacity_factor", default["capacity_factor"],
                       "--dispatch=capacity: expert buffer size as a multiple of the even "
                       f"share (default {DEFAULT_CAPACITY_FACTOR}; num_experts / k drops "
                       "nothing).", **where)
    flags.DEFINE_integer("capacity_group_size", default["capacity_group_size"],
                         "--dispatch=capacity: route the tokens in groups of this many, "
                         "each with its own expert buffers (GShard); default: the batch is "
                         "one group. Not with --strategy=dtensor.", **where)
    flags.DEFINE_boolean("recompute_activations", default["recompute_activations"],
                         "Recompute the experts' hidden activations on the backward pass "
                         "instead of keeping them (Appendix D).", **where)
    flags.DEFINE_enum("compiled_kernels", str(default["compiled_kernels"]).lower(),
                      list(_COMPILED_KERNELS),
                      "The compiled CPU kernels of moe_tf.kernels in training: auto (where "
                      "they apply), true (required), false (never).", **where)


def moe_config_from_flags(flag_values: flags.FlagValues = FLAGS,
                          **overrides) -> MoEConfig:
    """The MoEConfig of the MoE flags, with `overrides` (MoEConfig settings) in place.

    A flag left at None takes MoEConfig's default; `--num_groups=0` is a flat layer.

    Raises:
        ValueError: MoEConfig's refusal, in terms of the flags ("--k must be ...").
    """
    values = {name: flag_values[name].value for name in MOE_FLAGS}
    values["num_groups"] = values["num_groups"] or None
    values["compiled_kernels"] = _COMPILED_KERNELS[values["compiled_kernels"]]
    values.update(overrides)
    try:
        return MoEConfig(**{name: value for name, value in values.items()
                            if value is not None})
    except ValueError as error:
        raise ValueError(_in_flag_terms(str(error))) from None


def _in_flag_terms(message: str) -> str:
    """"MoEConfig: `k` must be ..." -> "--k must be ..."."""
    message = message.removeprefix("MoEConfig: ")
    for name in MOE_FLAGS:
        message = message.replace(f"`{name}`", f"--{name}")
    return message


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
    """`train.loop.check_run_config` for the model's config, the data flags and the
    optimizer; a run recorded by an earlier version is read as `upgrade_run_config`
    reads it."""
    loop.check_run_config(FLAGS.model_dir, {
        "model": dataclasses.asdict(model_config), "data": FLAGS.data,
        "valid_data": FLAGS.valid_data, "test_data": FLAGS.test_data,
        "max_length": FLAGS.max_length, "seed": FLAGS.seed,
        "optimizer": FLAGS.optimizer}, write=is_chief,
        upgrade=functools.partial(upgrade_run_config, type(model_config)))


def upgrade_run_config(config_class: type, run_config: Dict) -> Dict:
    """A recorded run config in today's layout: its "model" as `config_class.from_dict`
    reads it (MoE settings nested in "moe", also for runs recorded before), and adam as
    the optimizer of runs recorded before --optimizer."""
    run_config = dict(run_config)
    try:
        run_config["model"] = dataclasses.asdict(config_class.from_dict(run_config["model"]))
    except (KeyError, TypeError, ValueError):
        pass  # not a config of this model: the comparison lists how it differs
    if run_config.get("optimizer") is None:
        run_config["optimizer"] = "adam"
    return run_config


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


def make_optimizer(constant_steps: int = 0) -> keras.optimizers.Optimizer:
    """The --optimizer with the paper's schedule: linear warm-up, `constant_steps` at the
    peak, then 1/sqrt(step) decay; gradients clipped to --clip_norm."""
    schedule = WarmupInverseSqrt(FLAGS.learning_rate, warmup_steps=FLAGS.warmup_steps,
                                 constant_steps=constant_steps)
    optimizer = {"adam": keras.optimizers.Adam, "factored_adam": FactoredAdam}
    return optimizer[FLAGS.optimizer](learning_rate=schedule,
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
