"""Every placement differentiates the same loss (`train.distribution.differentiated_loss`),
on a Transformer block whose feed-forward sublayer is an MoE (models.transformer).

The MoE layer adds the balancing loss of the GLOBAL batch on every tf.distribute replica,
so a data-parallel step must take 1 / replicas of it, while a DTensor step (one program
over the global batch) takes all of it. Here one training step of plain SGD (learning rate
1, so a weight moves by exactly minus its gradient) is run under each placement on the
same model and batch, and the gate weights' gradient is compared with one device's: the
gradient of the auxiliary losses alone (the CV losses and the router z-loss), and of the
whole loss; so is the aux-loss-free bias after the step, which every replica must move
alike. A third loss is NaN on one replica's slice only: every placement must then skip
the whole update.

The placements need the CPU split into 2 logical devices before TensorFlow starts, so the
gradients are computed in a child process running this file, which prints them as JSON:
    python tests/test_placement.py
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if __name__ == "__main__":
    sys.path.insert(0, ROOT)

# name -> (--strategy, --mesh); all on 2 logical CPU devices.
PLACEMENTS = {
    "one_device": ("default", None),
    "mirrored": ("mirrored", None),
    "dtensor_batch2": ("dtensor", "batch:2,expert:1"),
    "dtensor_expert2": ("dtensor", "batch:1,expert:2"),
}
PARTS = ("auxiliary", "whole")
NONFINITE = "nan_on_one_replica"
VOCAB, DIM, ROWS, TIME = 11, 8, 4, 8


def _batch():
    """Token ids and targets `[ROWS, TIME]`, with padding (id 0) at some row ends."""
    rng = np.random.default_rng(1)
    tokens = rng.integers(1, VOCAB, size=(ROWS, TIME)).astype(np.int32)
    targets = rng.integers(1, VOCAB, size=(ROWS, TIME)).astype(np.int32)
    for row, length in enumerate((8, 5, 8, 3)):
        tokens[row, length:] = targets[row, length:] = 0
    return tokens, targets


def _loss_fn(part):
    """The task's `loss_fn`; for "auxiliary" its NLL is multiplied by 0, so the step's
    gradient is that of the layers' auxiliary losses alone; for NONFINITE it is NaN
    where the slice holds the row of 3 tokens (the second of two replicas' slices)."""
    import tensorflow as tf

    def loss_fn(model, batch, training):
        tokens, targets = batch
        logits = model(tokens, training=training)
        nll = tf.nn.sparse_softmax_cross_entropy_with_logits(targets, logits)
        real = tf.cast(targets != 0, nll.dtype)
        nll_sum = tf.reduce_sum(nll * real)
        if part == "auxiliary":
            nll_sum *= 0.0
        if part == NONFINITE:
            has_row_of_3 = tf.reduce_any(tf.reduce_sum(tf.sign(tokens), axis=1) == 3)
            nll_sum *= tf.where(has_row_of_3, float("nan"), 1.0)
        num_tokens = tf.reduce_sum(real)
        return nll_sum / tf.maximum(num_tokens, 1.0), nll_sum, num_tokens

    return loss_fn


def _build_model():
    """Embedding -> a Transformer block whose FFN is a deterministic MoE (capacity
    dispatch dropping no token) -> logits, every weight random (the same under every
    placement)."""
    import keras

    from models.transformer import TransformerBlock
    from moe_tf import MoEConfig

    tokens = keras.Input((None,), dtype="int32")
    x = keras.layers.Embedding(VOCAB, DIM, mask_zero=True)(tokens)
    x = TransformerBlock(num_heads=2, hidden_size=8, name="block", moe=MoEConfig(
        num_experts=4, k=2, hidden_size=8, noisy_gating=False, dispatch="capacity",
        capacity_factor=2.0, bias_update_rate=0.125, importance_weight=0.1,
        load_weight=0.1, router_z_loss_weight=0.05))(x)
    model = keras.Model(tokens, keras.layers.Dense(VOCAB)(x))
    rng = np.random.default_rng(0)
    for weight in model.trainable_weights:
        weight.assign(rng.normal(0.0, 0.5, weight.shape).astype(np.float32))
    return model


def _gate_gradient(strategy, mesh, part):
    """The gradient of the placement's differentiated loss w.r.t. the MoE gate weights;
    for NONFINITE, what the step did: its flags, and whether anything changed."""
    import keras
    import tensorflow as tf

    from train import distribution

    placement = distribution.make_placement(strategy, mesh=mesh)
    with placement.scope():
        model = _build_model()
        optimizer = keras.optimizers.SGD(learning_rate=1.0)
    moe = model.get_layer("block").ffn_moe
    w_gate = moe.w_gate
    gate_before = np.array(w_gate.numpy())
    before = [np.array(weight.numpy()) for weight in model.trainable_weights]
    placement.place(model, optimizer)
    step = placement.train_step(model, optimizer, _loss_fn(part))
    data = placement.input(tf.data.Dataset.from_tensors(_batch()))
    _, num_tokens, nonfinite = step(next(iter(data)))
    assert float(np.asarray(num_tokens)) == 24.0  # padding masked, nothing dropped
    placement.unplace(model)
    if part == NONFINITE:
        return {"loss_flagged": bool(np.asarray(nonfinite)[0] > 0),
                "steps": int(optimizer.iterations.numpy()),
                "changed": [bool((b != w.numpy()).any())
                            for b, w in zip(before, model.trainable_weights)]}
    assert not np.asarray(nonfinite).any()
    return {"gradient": (gate_before - w_gate.numpy()).tolist(),
            "bias": moe.gate.expert_bias.numpy().tolist()}


def main():
    from train import distribution
    distribution.configure_cpu_devices(2)
    gradients = {name: {part: _gate_gradient(strategy, mesh, part)
                        for part in PARTS + (NONFINITE,)}
                 for name, (strategy, mesh) in PLACEMENTS.items()}
    print(json.dumps(gradients))
    sys.stdout.flush()
    # DTensor processes can hang at exit.
    os._exit(0)


@pytest.fixture(scope="module")
def gradients():
    result = subprocess.run([sys.executable, os.path.abspath(__file__)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("part", PARTS)
@pytest.mark.parametrize("name", [name for name in PLACEMENTS if name != "one_device"])
def test_gate_gradient_matches_one_device(gradients, name, part):
    reference = gradients["one_device"][part]
    for key in ("gradient", "bias"):
        assert np.abs(reference[key]).max() > 1e-3  # the comparison is not of zeros
        np.testing.assert_allclose(np.array(gradients[name][part][key]),
                                   np.array(reference[key]), rtol=0, atol=1e-5,
                                   err_msg=f"{name}, {part} loss, {key}")


@pytest.mark.parametrize("name", list(PLACEMENTS))
def test_a_step_nan_on_one_replica_changes_no_variable(gradients, name):
    step = gradients[name][NONFINITE]
    assert step["loss_flagged"]
    assert step["steps"] == 0, "the optimizer counted a skipped step"
    assert not any(step["changed"]), step["changed"]


def test_differentiated_loss_on_one_device_is_mean_nll_plus_auxiliary_losses():
    import keras
    import tensorflow as tf

    from train.distribution import differentiated_loss

    class AddsLoss(keras.layers.Layer):
        def call(self, inputs):
            self.add_loss(tf.reduce_sum(inputs))
            return inputs

    model = keras.Sequential([AddsLoss(), AddsLoss()])
    model(tf.constant([1.5]))
    assert float(differentiated_loss(tf.constant(6.0), tf.constant(4.0), model)) == 4.5
    assert float(differentiated_loss(tf.constant(6.0), tf.constant(0.0),
                                     keras.Sequential([]))) == 6.0


if __name__ == "__main__":
    main()
