"""The training loop's answers to non-finite steps and overflowing losses, in process:
a small real model and a real tf.data pipeline whose loss is made NaN at chosen batches.

The binaries' faults (real signals, unwritable and corrupt checkpoints, bad data files)
are tested end to end in tests/test_faults.py."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from train.training import loop
from train.training.losses import masked_nll_sums

VOCAB = 11
NAN_VALUE = 7  # batch i holds token i % 10 + 1: batches 6, 16, ... hold 7


def batches() -> tf.data.Dataset:
    """Global batches `[2, 5]`: batch i is filled with token i % 10 + 1."""
    return tf.data.Dataset.range(1000).map(
        lambda i: tf.fill([2, 5], tf.cast(i % 10 + 1, tf.int32)))


def loss_fn(nan_when=lambda batch: tf.reduce_any(batch == NAN_VALUE), scale=1.0):
    """Next-token NLL, multiplied by `scale`, NaN where `nan_when(batch)` holds."""
    def compute(model, batch, training):
        mean, nll_sum, num_tokens = masked_nll_sums(
            model(batch[:, :-1], training=training), batch[:, 1:])
        factor = tf.where(nan_when(batch), float("nan"), scale)
        return mean * factor, nll_sum * factor, num_tokens

    return compute


def make_trainer(tmp_path, loss, **config) -> loop.Trainer:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.layers.Embedding(VOCAB, 8), keras.layers.Dense(VOCAB)])
    model.build((None, None))
    settings = dict(model_dir=str(tmp_path), train_steps=8, log_every=4,
                    checkpoint_every=5, max_eval_batches=1)
    settings.update(config)
    return loop.Trainer(model=model, optimizer=keras.optimizers.Adam(1e-2), loss_fn=loss,
                        train_data=batches(), eval_data={"valid": batches().take(1),
                                                         "test": batches().take(1)},
                        config=loop.LoopConfig(**settings))


def all_finite(model) -> bool:
    return all(np.isfinite(weight.numpy()).all() for weight in model.weights)


def test_skip_step_drops_the_nan_step_and_counts_it(tmp_path):
    trainer = make_trainer(tmp_path, loss_fn(), nan_policy="skip_step")
    metrics = trainer.train()
    # Batches 0-5 are steps 1-6, batch 6 is skipped, batches 7 and 8 are steps 7 and 8.
    assert metrics["global_step"] == 8
    assert metrics["skipped_steps"] == 1
    assert np.isfinite(metrics["final_train_loss"]) and all_finite(trainer.model)


def test_stop_policy_stops_at_the_nan_step_before_it_is_applied(tmp_path):
    trainer = make_trainer(tmp_path, loss_fn())
    with pytest.raises(loop.RunStopped) as stopped:
        trainer.train()
    message = str(stopped.value)
    assert message.startswith("Step 7 has a NaN or an Inf in the loss and the gradients "
                              "of "), message
    assert "the checkpoint of step 5 is kept" in message
    assert trainer.step == 6 and all_finite(trainer.model)
    assert tf.train.latest_checkpoint(str(tmp_path / "checkpoints")).endswith("ckpt-5")
    assert not (tmp_path / loop.METRICS_FILE).exists()


def test_skip_step_stops_after_too_many_in_a_row(tmp_path):
    trainer = make_trainer(tmp_path, loss_fn(nan_when=lambda batch: True),
                           nan_policy="skip_step", max_consecutive_skips=3)
    with pytest.raises(loop.RunStopped, match="3 steps in a row had a NaN or an Inf"):
        trainer.train()
    assert trainer.step == 0 and int(trainer.skipped_steps.numpy()) == 3
    assert all_finite(trainer.model)


def test_a_loss_too_large_for_exp_is_logged_as_infinite_perplexity(tmp_path):
    # A mean loss of ~2,400 nats: math.exp overflows (it used to crash the progress line).
    trainer = make_trainer(tmp_path, loss_fn(nan_when=lambda batch: False, scale=1e3),
                           train_steps=4)
    metrics = trainer.train()
    assert metrics["final_train_loss"] > 710
    assert math.isinf(metrics["valid_perplexity"])
