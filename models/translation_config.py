"""The translation model's settings, its ops per time step, and the dense baseline's width.

The model (Section 5.3, Appendix E; built by `models.translator`) is GNMT cut to 3 + 2
LSTM layers with an MoE layer in the encoder and one in the decoder. Architectures:
- `moe`: LSTMs `model_dim` wide;
- `dense`: the same model with its MoE layers removed and every LSTM widened (then
  projected) until the ops per time step match the `moe` model's (`ops_per_timestep`), or
  to `dense_lstm_width`.
"""

import dataclasses
from typing import Dict

from models.lm import lstm_ops
from models.recorded_config import check_shared_settings, model_config_from_dict
from moe_tf import MoEConfig

ARCHITECTURES = ("moe", "dense")
# Widest LSTM the dense model may get, as a multiple of model_dim.
MAX_WIDENING = 16
# The paper's MoE settings for translation (Appendix E, F): the strictly balanced gate for
# one language pair (noisy top-k for multilingual models), balancing weights 0.01.
TRANSLATION_MOE = MoEConfig(gating="balanced", importance_weight=0.01, load_weight=0.01)


@dataclasses.dataclass(frozen=True)
class TranslationConfig:
    """Sizes of a translation model. Defaults: the paper's widths divided by 4.

    `moe` holds the settings of both MoE layers (flat; expert hidden width 256, paper:
    2048); the dense model reads them only to match the moe model's ops.
    """

    architecture: str = "moe"
    vocab_size: int = 8192          # shared subwords (paper: 32k wordpieces)
    num_language_tokens: int = 0    # target-language tokens (multilingual models)
    model_dim: int = 128            # embedding, residual stream (paper: 512 projection)
    attention_dim: int = 128        # width of tanh(x U) and tanh(y W)
    moe: MoEConfig = TRANSLATION_MOE
    dropout: float = 0.1
    dense_lstm_width: int = 0       # dense only: LSTM units; 0: match the moe model's ops

    def __post_init__(self):
        check_shared_settings(self, ARCHITECTURES)
        if self.moe.is_hierarchical:
            raise ValueError("the translation model's MoE layers are flat: moe.num_groups "
                             f"must be None; got {self.moe.num_groups}.")
        if self.model_dim < 2 or self.model_dim % 2:
            raise ValueError(f"model_dim must be even (the bidirectional layer gives half "
                             f"to each direction); got {self.model_dim}.")
        if self.dense_lstm_width and self.has_moe:
            raise ValueError("dense_lstm_width is for the dense model; the moe model's "
                             "LSTMs are model_dim wide.")
        if self.dense_lstm_width < 0 or self.dense_lstm_width % 2:
            raise ValueError(f"dense_lstm_width must be even (the bidirectional layer "
                             f"gives half to each direction) and >= 0; got "
                             f"{self.dense_lstm_width}.")

    @classmethod
    def from_dict(cls, values: Dict) -> "TranslationConfig":
        """The config of a recorded `dataclasses.asdict`, also of runs recorded before
        `moe` (see `models.recorded_config`)."""
        return model_config_from_dict(cls, values)

    @property
    def has_moe(self) -> bool:
        return self.architecture == "moe"

    @property
    def lstm_width(self) -> int:
        """Units of every LSTM: `model_dim`, or for `dense` `dense_lstm_width` if set, else
        the even width whose ops per time step are closest to those of the `moe` model of
        the same config."""
        if self.has_moe:
            return self.model_dim
        if self.dense_lstm_width:
            return self.dense_lstm_width
        target = ops_per_timestep(dataclasses.replace(self, architecture="moe"))
        widths = range(self.model_dim, MAX_WIDENING * self.model_dim + 1, 2)
        return min(widths, key=lambda width: abs(_ops(self, width) - target))


def _lstm_layer_ops(input_dim: int, units: int, output_dim: int,
                    bidirectional: bool = False) -> int:
    recurrent = (2 * lstm_ops(input_dim, units // 2) if bidirectional
                 else lstm_ops(input_dim, units))
    return recurrent + (units * output_dim if units != output_dim else 0)


def _moe_ops(config: TranslationConfig, input_dim: int) -> int:
    """The gate (x W_g, and x W_noise for noisy top-k) and the k experts of one token."""
    moe = config.moe
    gate = input_dim * moe.num_experts * (2 if moe.noisy_gating else 1)
    return gate + moe.assignments_per_token * moe.hidden_size * (input_dim
                                                                 + config.model_dim)


def _ops(config: TranslationConfig, width: int) -> int:
    d, a = config.model_dim, config.attention_dim
    encoder = (_lstm_layer_ops(d, width, d, bidirectional=True)
               + 2 * _lstm_layer_ops(d, width, d)
               + d * a)                                   # keys tanh(x U)
    decoder = (_lstm_layer_ops(d, width, d)
               + d * a + a                                # query tanh(y W), times V
               + _lstm_layer_ops(2 * d, width, d))        # reads [x, context]
    if config.has_moe:
        encoder += _moe_ops(config, d)
        decoder += _moe_ops(config, 2 * d)
    return encoder + decoder


def ops_per_timestep(config: TranslationConfig) -> int:
    """Forward multiply-adds for one source token through the encoder plus one target
    token through the decoder, excluding embedding and softmax (as Table 7 counts).

    The attention's per-token projections count; its per (source, target) position pair
    part (`attention_dim + model_dim` for the score and the context) grows with the source
    length, is the same in both architectures and is left out. MoE layers count the gate
    and k experts (a balanced gate routes each token to k experts on average).
    """
    return _ops(config, config.lstm_width)
