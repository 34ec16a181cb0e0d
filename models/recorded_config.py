"""Model configs from their recorded form, in today's layout or the one before MoEConfig.

A model config (`LanguageModelConfig`, `TranslationConfig`) is recorded as
`dataclasses.asdict` gives it: in run_config.json's "model" entry and in
`Translator.get_config`. Today its MoE settings are one nested entry, "moe" (a
`moe_tf.MoEConfig`). Runs recorded before that listed them beside the model's own settings
(`num_experts`, `k`, `noisy_gating`, ... and the translation model's `gating`), with the
gate settings of every gate whatever the gate; such a record reads as the config class's
default MoE settings with the recorded ones in place, less the gate settings that its gate
never read.
"""

import dataclasses
from typing import Dict, Type, TypeVar

from moe_tf import GATES, MoEConfig
from moe_tf.gates import gate_option_names

MOE_SETTINGS = frozenset(field.name for field in dataclasses.fields(MoEConfig))

ModelConfig = TypeVar("ModelConfig")


def check_shared_settings(config, architectures) -> None:
    """The settings every model config has: `architecture` one of `architectures`, `moe`
    a MoEConfig, `dropout` in [0, 1); ValueError naming the first bad one."""
    if config.architecture not in architectures:
        raise ValueError(f"architecture must be one of {architectures}; got "
                         f"{config.architecture!r}.")
    if not isinstance(config.moe, MoEConfig):
        raise ValueError(f"moe must be a moe_tf.MoEConfig; got "
                         f"{type(config.moe).__name__}.")
    if not 0 <= config.dropout < 1:
        raise ValueError(f"dropout must be in [0, 1); got {config.dropout}.")


def default_moe(config_class: type) -> MoEConfig:
    """The `moe` default of a model config class."""
    (field,) = [f for f in dataclasses.fields(config_class) if f.name == "moe"]
    if field.default is not dataclasses.MISSING:
        return field.default
    return field.default_factory()


def model_config_from_dict(config_class: Type[ModelConfig], values: Dict) -> ModelConfig:
    """`config_class` from a recorded dict of either layout.

    Raises:
        ValueError: a setting no config of `config_class` has, or a recorded value the
            config refuses.
    """
    values = dict(values)
    own = {field.name for field in dataclasses.fields(config_class)}
    flat = {name: values.pop(name) for name in list(values)
            if name in MOE_SETTINGS and name not in own}
    unknown = sorted(set(values) - own)
    if unknown:
        raise ValueError(f"{config_class.__name__}: unknown settings {unknown}.")
    if "moe" in values:
        if flat:
            raise ValueError(f"{config_class.__name__}: MoE settings {sorted(flat)} beside "
                             "the nested `moe` entry.")
        moe = values.pop("moe")
        moe = moe if isinstance(moe, MoEConfig) else MoEConfig.from_dict(moe)
    else:
        moe = _moe_from_flat_settings(default_moe(config_class), flat)
    return config_class(moe=moe, **values)


def _moe_from_flat_settings(default: MoEConfig, recorded: Dict) -> MoEConfig:
    """The MoE settings of a record from before MoEConfig (see the module docstring)."""
    gate = GATES.get(recorded.get("gating", default.gating))
    if gate is not None:  # else MoEConfig names the unknown gate
        recorded = {name: value for name, value in recorded.items()
                    if name not in gate_option_names() or name in gate.options}
    return default.replace(**recorded)
