"""Reading back what a training run left in its `--model_dir`."""

import dataclasses
import os
from typing import Callable, NamedTuple

import keras
import tensorflow as tf

from train.data.tokenizer import TOKENIZER_FILE, SubwordTokenizer
from train.training.loop import CHECKPOINT_DIR
from train.training.run_config import CONFIG_FILE, read_run_config


class TrainedModel(NamedTuple):
    model: keras.Model
    tokenizer: SubwordTokenizer
    run_config: dict
    config: object  # the model's config (`config_class`), with the run's vocabulary size


def restore_trained_model(model_dir: str, config_class: type,
                          build_model: Callable) -> TrainedModel:
    """The model of the run in `model_dir` at its latest checkpoint.

    Args:
        model_dir: a training run's `--model_dir` (run_config.json, the tokenizer and
            checkpoints/).
        config_class: the model's config dataclass (`LanguageModelConfig`,
            `TranslationConfig`), built by its `from_dict` from run_config.json's
            "model" entry (of this version or an earlier one).
        build_model: builds the model from that config.

    Returns:
        The restored model, the run's tokenizer, its run config and the model's config.
    """
    run_config = read_run_config(model_dir)
    if run_config is None:
        raise FileNotFoundError(f"{os.path.join(model_dir, CONFIG_FILE)} not found: "
                                f"{model_dir} holds no training run.")
    latest = tf.train.latest_checkpoint(os.path.join(model_dir, CHECKPOINT_DIR))
    if latest is None:
        raise FileNotFoundError(f"{model_dir} has no checkpoint in {CHECKPOINT_DIR}/.")
    tokenizer = SubwordTokenizer.load(os.path.join(model_dir, TOKENIZER_FILE))
    config = dataclasses.replace(config_class.from_dict(run_config["model"]),
                                 vocab_size=tokenizer.vocab_size)
    model = build_model(config)
    tf.train.Checkpoint(model=model).restore(latest).expect_partial()
    return TrainedModel(model=model, tokenizer=tokenizer, run_config=run_config,
                        config=config)
