"""The MoE layer of a model, from the settings every model config carries."""

from moe_tf import SparselyGatedMoE


def moe_from_config(config, **layer_arguments) -> SparselyGatedMoE:
    """A `SparselyGatedMoE` from a model config's shared MoE fields.

    `config` has `num_experts`, `k`, `hidden_size`, `noisy_gating`, `importance_weight`,
    `load_weight`, `dispatch`, `capacity_factor` and `capacity_group_size`
    (`LanguageModelConfig`, `TranslationConfig`); `layer_arguments` are the model's own
    (name, hierarchy, gating, output size).
    """
    return SparselyGatedMoE(
        config.num_experts, config.k, config.hidden_size,
        noisy_gating=config.noisy_gating, importance_weight=config.importance_weight,
        load_weight=config.load_weight, dispatch=config.dispatch,
        capacity_factor=config.capacity_factor,
        capacity_group_size=config.capacity_group_size, **layer_arguments)
