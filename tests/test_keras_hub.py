"""moe_tf.integrations.keras_hub.sparsify on small random-weight keras-hub models of
every supported family: equal outputs, equal generation, training through the swap."""

import keras
import numpy as np
import pytest
import tensorflow as tf

keras_hub = pytest.importorskip(
    "keras_hub", reason="keras-hub is not installed (pip install moe_tf[keras-hub])")

from moe_tf.integrations.keras_hub import KerasHubSparseMoE, sparsify  # noqa: E402

VOCABULARY = 61
COMMON = dict(vocabulary_size=VOCABULARY, num_layers=2, num_query_heads=4,
              num_key_value_heads=2, hidden_dim=16)
FAMILIES = {
    "mixtral": (keras_hub.models.MixtralBackbone, keras_hub.models.MixtralCausalLM,
                dict(intermediate_dim=8, num_experts=6, top_k=2)),
    "qwen3_moe": (keras_hub.models.Qwen3MoeBackbone, keras_hub.models.Qwen3MoeCausalLM,
                  dict(intermediate_dim=12, moe_intermediate_dim=8, num_experts=6, top_k=3,
                       head_dim=4,
                       norm_top_k_prob=False, router_aux_loss_coefficient=0.01)),
    "gpt_oss": (keras_hub.models.GptOssBackbone, keras_hub.models.GptOssCausalLM,
                dict(intermediate_dim=8, num_experts=6, top_k=2)),
    "qwen_moe": (keras_hub.models.QwenMoeBackbone, keras_hub.models.QwenMoeCausalLM,
                 dict(intermediate_dim=12, moe_intermediate_dim=8,
                      shared_expert_intermediate_dim=10, num_experts=6, top_k=2,
                      norm_top_k_prob=True)),
    "qwen3_5_moe": (keras_hub.models.Qwen3_5MoeBackbone, keras_hub.models.Qwen3_5MoeCausalLM,
                    dict(head_dim=4, moe_intermediate_dim=8, shared_expert_intermediate_size=10,
                         num_experts=6, top_k=2, linear_num_key_heads=2,
                         linear_num_value_heads=2, linear_key_head_dim=4,
                         linear_value_head_dim=4)),
}
SPARSE_BLOCKS = ("MixtralSparseMoeBlock", "Qwen3SparseMoeBlock", "QwenSparseMoeBlock",
                 "Qwen3_5MoeSparseMoeBlock", "GptOssSparseMoeBlock")


def _causal_lm(family: str):
    backbone_class, task_class, settings = FAMILIES[family]
    keras.utils.set_random_seed(7)
    backbone = backbone_class(**COMMON, **settings)
    # Random values everywhere, biases too (the initializers leave them 0), and large
    # enough that the routing and GPT-OSS's clamps are exercised.
    rng = np.random.default_rng(1)
    for weight in backbone.weights:
        weight.assign(rng.normal(size=weight.shape).astype(np.float32)
                      * (0.5 if len(weight.shape) > 1 else 0.3))
    return task_class(backbone=backbone, preprocessor=None)


def _inputs(seed=0, batch=3, length=9):
    rng = np.random.default_rng(seed)
    padding = np.ones((batch, length), bool)
    padding[0, -3:] = False
    return {"token_ids": rng.integers(1, VOCABULARY, (batch, length)).astype("int32"),
            "padding_mask": padding}


def _moe_blocks(model):
    return [layer for layer in model.backbone._flatten_layers()
            if type(layer).__name__ in SPARSE_BLOCKS + ("KerasHubSparseMoE",)]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_sparsified_model_gives_the_same_outputs(family):
    causal_lm = _causal_lm(family)
    inputs = _inputs()
    dense_blocks = _moe_blocks(causal_lm)
    assert len(dense_blocks) == 2
    hidden = tf.constant(np.random.default_rng(2).normal(size=(2, 5, 16)), tf.float32)
    dense_block_outputs = [block(hidden) for block in dense_blocks]
    logits = causal_lm(inputs).numpy()
    count = len(causal_lm.weights)

    assert sparsify(causal_lm) is causal_lm
    sparse_blocks = _moe_blocks(causal_lm)
    assert [type(b) for b in sparse_blocks] == [KerasHubSparseMoE] * 2
    np.testing.assert_allclose(causal_lm(inputs).numpy(), logits, rtol=1e-5, atol=1e-5)
    for block, (want_outputs, want_router) in zip(sparse_blocks, dense_block_outputs):
        outputs, router = block(hidden)
        # Float32 rounding of sums of terms up to ~10: relative to the outputs' scale.
        scale = np.abs(want_outputs.numpy()).max()
        np.testing.assert_allclose(outputs.numpy(), want_outputs.numpy(), rtol=1e-5,
                                   atol=1e-6 * scale)
        np.testing.assert_allclose(router.numpy(), want_router.numpy(), rtol=1e-5,
                                   atol=1e-6)
    # The dense blocks' weights left the model; a gate and an up kernel become one
    # (Mixtral's routed experts, the Qwen shared experts).
    merged = family in ("mixtral", "qwen_moe", "qwen3_5_moe")
    assert len(causal_lm.weights) == count - (2 if merged else 0)
    assert not any("expert_bank" in w.path or "experts/gate_up_proj" in w.path
                   for w in causal_lm.weights)


def test_a_model_without_moe_blocks_is_refused_by_name():
    backbone = keras_hub.models.Qwen3MoeBackbone(
        **COMMON, intermediate_dim=8, moe_intermediate_dim=4, num_experts=4, head_dim=4,
        mlp_only_layers=[0, 1])
    with pytest.raises(ValueError, match="no MoE block that moe_tf can replace; supported: "
                                         + ", ".join(SPARSE_BLOCKS)):
        sparsify(backbone)
    with pytest.raises(ValueError, match="not a keras-hub backbone"):
        sparsify(keras.Sequential([keras.layers.Dense(2)]))


def test_generation_is_unchanged():
    causal_lm = _causal_lm("qwen3_moe")
    prompt = _inputs(seed=3, batch=2, length=12)
    prompt["padding_mask"][:, 6:] = False   # 6 prompt tokens, then 6 generated
    prompt["token_ids"][:, 6:] = 0
    causal_lm.compile(sampler="greedy")
    before = causal_lm.generate(prompt, max_length=12, stop_token_ids=None)
    sparsify(causal_lm)
    causal_lm.compile(sampler="greedy")
    after = causal_lm.generate(prompt, max_length=12, stop_token_ids=None)
    np.testing.assert_array_equal(after["token_ids"], before["token_ids"])
    assert (before["token_ids"][:, 6:] != 0).any()


def _loss_and_gradients(causal_lm, inputs):
    labels = np.roll(inputs["token_ids"], -1, axis=1)
    with tf.GradientTape() as tape:
        logits = causal_lm(inputs, training=True)
        loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
            labels, logits, from_logits=True))
        auxiliary = tf.add_n(causal_lm.losses)
        total = loss + auxiliary
    variables = causal_lm.trainable_variables
    grads = [tf.convert_to_tensor(g) if g is not None else None   # embeddings: sparse
             for g in tape.gradient(total, variables)]
    return float(total), float(auxiliary), dict(zip((id(v) for v in variables), grads)), \
        variables


def test_training_through_the_sparsified_model():
    """Mixtral: the same loss (its balancing loss included) and the same gradients for
    the same variables; the experts' gradients are the dense ones, re-laid-out; fit
    trains every variable."""
    causal_lm = _causal_lm("mixtral")
    inputs = _inputs(seed=4)
    inputs["padding_mask"][:] = True  # Mixtral's balancing loss slices its mask oddly
    total, auxiliary, dense_grads, dense_variables = _loss_and_gradients(causal_lm, inputs)
    bank = _moe_blocks(causal_lm)[0].expert_bank
    want_kernel_in = np.concatenate([
        dense_grads[id(bank._expert_feedforward_gate_dense)].numpy(),
        dense_grads[id(bank._expert_feedforward_intermediate_dense)].numpy()], axis=-1)

    sparsify(causal_lm)
    sparse_total, sparse_auxiliary, grads, variables = _loss_and_gradients(causal_lm,
                                                                           inputs)
    assert auxiliary > 0
    np.testing.assert_allclose([sparse_total, sparse_auxiliary], [total, auxiliary],
                               rtol=1e-5)
    assert all(g is not None for g in grads.values())
    shared = [v for v in dense_variables if id(v) in grads]
    assert len(shared) == len(variables) - 6  # the two MoE layers' three weights each
    for variable in shared:
        np.testing.assert_allclose(grads[id(variable)].numpy(),
                                   dense_grads[id(variable)].numpy(), rtol=1e-4, atol=1e-6,
                                   err_msg=variable.path)
    moe = _moe_blocks(causal_lm)[0].moe
    np.testing.assert_allclose(grads[id(moe.experts.kernel_in)].numpy(), want_kernel_in,
                               rtol=1e-4, atol=1e-6)

    causal_lm.compile(optimizer=keras.optimizers.SGD(0.01),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    before = [v.numpy().copy() for v in causal_lm.trainable_variables]
    history = causal_lm.fit(inputs, np.roll(inputs["token_ids"], -1, axis=1), epochs=1,
                            verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert all(not np.array_equal(v.numpy(), b)
               for v, b in zip(causal_lm.trainable_variables, before))


def test_keras_hub_bench_measures_both_and_formats_the_table():
    from benchmarks import keras_hub_bench

    sizes = dict(tokens=32, model_dim=16, hidden=8, batch=2, length=6, vocab=40, prompt=3,
                 new_tokens=2, steps=1)
    result = keras_hub_bench.measure("qwen3_moe", 8, 2, sizes)
    for key in ("block_forward", "block_forward_backward", "model_forward",
                "model_forward_backward", "generate_tokens_per_second"):
        assert len(result[key]) == 2 and all(value > 0 for value in result[key])
    dense, sparse = result["block_forward"]
    table = keras_hub_bench.format_table([result], sizes)
    assert f"| qwen3_moe | 8 | 2 | block forward | {dense * 1e3:,.1f} | {sparse * 1e3:,.1f} | "\
           f"{dense / sparse:.2f}x |" in table


def test_a_sparse_block_with_a_shared_expert_round_trips_its_config():
    causal_lm = sparsify(_causal_lm("qwen_moe"))
    block = _moe_blocks(causal_lm)[0]
    assert block.shared_expert_hidden_size == 10
    copy = KerasHubSparseMoE.from_config(block.get_config())
    copy.build((None, None, 16))
    copy.set_weights(block.get_weights())
    hidden = tf.constant(np.random.default_rng(5).normal(size=(2, 3, 16)), tf.float32)
    for got, want in zip(copy(hidden), block(hidden)):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-6, atol=1e-6)
