"""The flags every training binary shares: data, the MoE layer's settings, optimisation,
the loop, the run directory and the devices.

A binary defines them, with its own, in a function its entry point (`run`) calls, not
when its module is imported: two binaries' modules can then share a process (absl
refuses a flag defined twice in one FlagValues).
"""

import contextlib
import dataclasses

from absl import flags

from moe_tf import GATES, MoEConfig
from moe_tf.config import DEFAULT_CAPACITY_FACTOR, DISPATCHES
from moe_tf.experts import GATED_VARIANTS, KERNEL_STORAGES
from train.cli import exit_with_error
from train.distribution import DTENSOR_LENGTH_MULTIPLE, STRATEGIES
from train.training.loop import NAN_POLICIES
from train.training.optimizer import OPTIMIZERS

FLAGS = flags.FLAGS


def define_common_flags(*, default_data: str,
                        flag_values: flags.FlagValues = FLAGS) -> None:
    """The flags of every training binary, with their checks, in `flag_values`."""
    _define_data_flags(default_data, flag_values)
    _define_run_flags(flag_values)
    define_moe_flags(flag_values)
    _define_optimisation_flags(flag_values)
    _define_loop_flags(flag_values)
    _define_placement_flags(flag_values)
    _register_checks(flag_values)


def _define_data_flags(default_data: str, flag_values: flags.FlagValues) -> None:
    where = dict(flag_values=flag_values)
    flags.DEFINE_string("data", default_data, "Training data spec (see README).", **where)
    flags.DEFINE_string("valid_data", None, "Held-out file for --data=text:PATH.", **where)
    flags.DEFINE_string("test_data", None, "Test file for --data=text:PATH.", **where)
    flags.DEFINE_integer("vocab_size", 8192, "Subword vocabulary size.", **where)
    flags.DEFINE_integer("max_length", 64, "Subword pieces per sentence kept.", **where)
    flags.DEFINE_integer("batch_tokens", 4096, "Target tokens per batch.", **where)
    flags.DEFINE_integer("length_multiple", 1,
                         "Pads every batch's length to a multiple of this "
                         f"({DTENSOR_LENGTH_MULTIPLE} gives one device the token layout of "
                         "--strategy=dtensor).", **where)
    flags.DEFINE_integer("shuffle_buffer", 10000, "Lines in the shuffle buffer.", **where)


def _define_run_flags(flag_values: flags.FlagValues) -> None:
    where = dict(flag_values=flag_values)
    flags.DEFINE_string("model_dir", "/tmp/moe_tf_run",
                        "Checkpoints, summaries, vocabulary and metrics.json go here.",
                        **where)
    flags.DEFINE_string("export_dir", None,
                        "Where to write the SavedModel at the end (default: "
                        "MODEL_DIR/export). Empty string: no export.", **where)
    flags.DEFINE_enum("export_expert_dtype", "float32", list(KERNEL_STORAGES),
                      "How the export stores the MoE experts' kernels: float32, bfloat16, "
                      "or weight-only int8 (a scale per expert and output channel), "
                      "dequantised in the graph. Checkpoints stay float32.", **where)
    flags.DEFINE_enum("preset", None, ["tiny"],
                      "A very small model and run for tests and smoke runs; explicit "
                      "flags still win.", **where)
    flags.DEFINE_integer("seed", 0, "Seed of initialisation, shuffling, noise, dropout.",
                         **where)


def _define_optimisation_flags(flag_values: flags.FlagValues) -> None:
    where = dict(flag_values=flag_values)
    flags.DEFINE_enum("optimizer", "adam", list(OPTIMIZERS),
                      "adam, or factored_adam: Adam without first moment and with a "
                      "factored second moment (Appendix D; moe_tf.optimizers).", **where)
    flags.DEFINE_float("dropout", 0.1, "Dropout on every layer's output.", **where)
    flags.DEFINE_integer("train_steps", 900, "Total optimizer steps.", **where)
    flags.DEFINE_float("learning_rate", 2e-3, "Peak learning rate.", **where)
    flags.DEFINE_integer("warmup_steps", 200, "Linear warm-up steps.", **where)
    flags.DEFINE_float("clip_norm", 1.0, "Global gradient-norm clip; 0 for none.", **where)


def _define_loop_flags(flag_values: flags.FlagValues) -> None:
    where = dict(flag_values=flag_values)
    flags.DEFINE_integer("eval_every", 300, "Held-out evaluation period; 0: at the end.",
                         **where)
    flags.DEFINE_integer("max_eval_batches", 0, "Limit on held-out batches; 0: all.",
                         **where)
    flags.DEFINE_integer("log_every", 50, "Progress line and summaries period.", **where)
    flags.DEFINE_integer("checkpoint_every", 100, "Checkpoint period.", **where)
    flags.DEFINE_enum("nan_policy", "stop", list(NAN_POLICIES),
                      "A step whose loss or gradients hold a NaN or an Inf is never "
                      "applied; then " + "; ".join(f"{name}: {text}" for name, text
                                                   in NAN_POLICIES.items()) + ".", **where)
    flags.DEFINE_integer("max_consecutive_skips", 10,
                         "--nan_policy=skip_step: stop after this many skipped steps in a "
                         "row.", **where)


def _define_placement_flags(flag_values: flags.FlagValues) -> None:
    where = dict(flag_values=flag_values)
    flags.DEFINE_enum("strategy", "default", list(STRATEGIES),
                      "default: one device; mirrored: data parallel over local devices; "
                      "multi_worker: data parallel over TF_CONFIG's workers; dtensor: "
                      "batch and experts split over the --mesh.", **where)
    flags.DEFINE_string("mesh", None,
                        "DTensor mesh for --strategy=dtensor, e.g. batch:2,expert:2 (the "
                        "product must be the number of devices).", **where)
    flags.DEFINE_boolean("jit_compile", False,
                         "Compile the training and evaluation steps with XLA (one "
                         "program per batch shape). Needs --strategy=default and, for "
                         "an MoE model, --dispatch=capacity (the sparse dispatch has "
                         "dynamic shapes).", **where)
    flags.DEFINE_integer("num_cpu_devices", 1,
                         "Split the CPU into this many logical devices (to try the "
                         "strategies on one machine).", **where)


def _register_checks(flag_values: flags.FlagValues) -> None:
    """The common flags' own ranges, and the settings that do not go together."""
    where = dict(flag_values=flag_values)
    require_at_least(1, ("vocab_size", "max_length", "batch_tokens", "length_multiple",
                         "train_steps",
                         "log_every", "checkpoint_every", "shuffle_buffer", "max_consecutive_skips",
                         "num_cpu_devices"), flag_values)
    require_at_least(0, ("warmup_steps", "eval_every", "max_eval_batches", "clip_norm"),
                     flag_values)
    flags.register_validator("learning_rate", lambda v: v is not None and v > 0,
                             message="--learning_rate must be > 0.", **where)
    # Empty, the run's files would land in the working directory.
    flags.register_validator("model_dir", bool,
                             message="--model_dir must name the run's directory.", **where)
    flags.register_validator("dropout", lambda v: v is not None and 0 <= v < 1,
                             message="--dropout must be in [0, 1).", **where)
    flags.register_multi_flags_validator(
        ["jit_compile", "strategy"],
        lambda v: not v["jit_compile"] or v["strategy"] == "default",
        message="--jit_compile needs --strategy=default (XLA compiles one device's "
                "step; the other strategies' steps hold cross-device collectives).",
        **where)
    flags.register_multi_flags_validator(
        ["strategy", "dispatch", "mesh"],
        lambda v: v["strategy"] != "dtensor" or (v["dispatch"] == "capacity"
                                                 and v["mesh"]),
        message="--strategy=dtensor needs --mesh (e.g. batch:2,expert:2) and "
                "--dispatch=capacity (the experts run on fixed-size buffers that DTensor "
                "moves between devices).", **where)


def require_at_least(minimum: int, names, flag_values: flags.FlagValues = FLAGS) -> None:
    """Validators: each flag of `names` must be set and >= `minimum`."""
    for name in names:
        flags.register_validator(name, lambda v: v is not None and v >= minimum,
                                 message=f"--{name} must be >= {minimum}.",
                                 flag_values=flag_values)


# One flag per MoEConfig setting, of the same name; its default is MoEConfig's (None for
# the settings a gate or the dispatch fills in). MoEConfig checks the values.
_MOE_DEFAULTS = {field.name: field.default for field in dataclasses.fields(MoEConfig)}
MOE_FLAGS = tuple(_MOE_DEFAULTS)
_COMPILED_KERNELS = {"auto": "auto", "true": True, "false": False}


def define_moe_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """The MoE flags (`moe_config_from_flags` reads them) in `flag_values`."""
    define_layer_size_flags(flag_values)
    define_gating_flags(flag_values)
    define_dispatch_and_expert_flags(flag_values)


def define_layer_size_flags(flag_values: flags.FlagValues) -> None:
    """Experts, k, their width and the hierarchical groups."""
    default, where = _MOE_DEFAULTS, dict(flag_values=flag_values)
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


def define_gating_flags(flag_values: flags.FlagValues) -> None:
    """The gate and its options, and the balancing losses' weights."""
    default, where = _MOE_DEFAULTS, dict(flag_values=flag_values)
    top_k, balanced = GATES["top_k"].options, GATES["balanced"].options
    top_p, softmax_top_k = GATES["top_p"].options, GATES["softmax_top_k"].options
    flags.DEFINE_enum("gating", default["gating"], list(GATES),
                      "MoE gating: top_k (noisy top-k, Eq. 3-5), balanced (strictly "
                      "balanced, Appendix F), switch (top-1, needs --k=1), top_p (dynamic "
                      "k, at most --k), expert_choice (each expert takes its top "
                      "tokens, --k per token on average) or softmax_top_k (Mixtral's "
                      "routing).", **where)
    flags.DEFINE_boolean("noisy_gating", default["noisy_gating"],
                         "--gating=top_k: trained gating noise (Eq. 4); default "
                         f"{top_k['noisy_gating']}.", **where)
    flags.DEFINE_float("noise_epsilon", default["noise_epsilon"],
                       "--gating=top_k: floor of the noise scale; default "
                       f"{top_k['noise_epsilon']}.", **where)
    flags.DEFINE_float("bias_update_rate", default["bias_update_rate"],
                       "--gating=top_k (flat): > 0 balances without a loss (DeepSeek-V3's "
                       "selection bias, moved by this much per step); default "
                       f"{top_k['bias_update_rate']}.", **where)
    flags.DEFINE_float("threshold_loss_weight", default["threshold_loss_weight"],
                       "--gating=balanced: weight of the threshold loss; default "
                       f"{balanced['threshold_loss_weight']}.", **where)
    flags.DEFINE_float("switch_loss_weight", default["switch_loss_weight"],
                       "--gating=switch or top_p: weight of the Switch balancing loss; "
                       f"default {top_p['switch_loss_weight']}.", **where)
    flags.DEFINE_float("top_p_threshold", default["top_p_threshold"],
                       "--gating=top_p: the probability mass a token's experts reach; "
                       f"default {top_p['top_p_threshold']}.", **where)
    flags.DEFINE_boolean("normalize_top_k", default["normalize_top_k"],
                         "--gating=softmax_top_k: renormalise the k gates to sum to 1; "
                         f"default {softmax_top_k['normalize_top_k']}.", **where)
    flags.DEFINE_boolean("router_bias", default["router_bias"],
                         "--gating=softmax_top_k: a trained bias on the router's logits; "
                         f"default {softmax_top_k['router_bias']}.", **where)
    flags.DEFINE_float("router_z_loss_weight", default["router_z_loss_weight"],
                       "Weight of the router z-loss (ST-MoE), any gating.", **where)
    flags.DEFINE_float("importance_weight", default["importance_weight"],
                       "w_importance; default 0.1, or 0 with a gate balanced otherwise "
                       "(switch, top_p, expert_choice, --bias_update_rate).", **where)
    flags.DEFINE_float("load_weight", default["load_weight"],
                       "w_load; default as --importance_weight.", **where)


def define_dispatch_and_expert_flags(flag_values: flags.FlagValues) -> None:
    """How tokens reach the experts, and what the experts are."""
    default, where = _MOE_DEFAULTS, dict(flag_values=flag_values)
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
    flags.DEFINE_string("expert_activation", default["expert_activation"],
                        "The experts' activation, a Keras activation name (relu, silu, "
                        "gelu, ...).", **where)
    flags.DEFINE_enum("gated_experts", default["gated_experts"], list(GATED_VARIANTS),
                      "Gated experts: glu (activation(x W_gate) * x W_up, then W_down: "
                      "SwiGLU with --expert_activation=silu) or gpt_oss; default: the "
                      "paper's FFN experts.", **where)
    flags.DEFINE_boolean("expert_bias", default["expert_bias"],
                         "Whether the experts have biases.", **where)


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
    """Turns the ValueErrors of set-up checks into one line and exit status 2, not a
    traceback (`train.cli.exit_with_error`)."""
    try:
        yield
    except ValueError as error:
        exit_with_error(str(error))
