"""keras-hub's MoE blocks against the same blocks sparsified by moe_tf.

    python -m benchmarks.keras_hub_bench              # blocks, small models, generation
    python -m benchmarks.keras_hub_bench --quick      # smaller sizes, a minute or two

keras-hub computes every expert on every token and keeps k; `sparsify`
(moe_tf.integrations.keras_hub) runs the k chosen experts only. For each configuration
(family, experts E, experts per token k), in one process:
- block: one MoE block on T tokens of width d, forward (inference) and forward +
  backward (the loss sum(y * dy) and its gradients for the inputs and every weight);
- model: a small causal LM (2 decoder layers) on a batch of sequences, forward and
  forward + backward through the LM loss;
- generate: greedy generation of new tokens by that causal LM (tokens/s).
Each is timed as the median of alternating steps, keras-hub's and the sparsified
copy's (the same weight values), inside `tf.function`s; the ratio is keras-hub's time over
moe_tf's (above 1: moe_tf is faster). Outputs are checked equal before timing.
"""

import argparse
import statistics
import time
from typing import Callable, Dict, List

import keras
import numpy as np
import tensorflow as tf

import keras_hub
from moe_tf.integrations.keras_hub import sparsify

FAMILIES = {"mixtral": (keras_hub.models.MixtralBackbone, keras_hub.models.MixtralCausalLM),
            "qwen3_moe": (keras_hub.models.Qwen3MoeBackbone,
                          keras_hub.models.Qwen3MoeCausalLM)}
# (family, experts, experts per token): Mixtral's shape, and a many-expert model's.
CONFIGS = (("mixtral", 8, 2), ("qwen3_moe", 64, 8))
SIZES = {
    "full": dict(tokens=4096, model_dim=512, hidden=512, batch=8, length=128, vocab=2000,
                 prompt=16, new_tokens=32, steps=5),
    "quick": dict(tokens=1024, model_dim=128, hidden=128, batch=4, length=64, vocab=500,
                  prompt=8, new_tokens=8, steps=3),
}


def _backbone(family: str, experts: int, k: int, sizes: Dict):
    settings = dict(vocabulary_size=sizes["vocab"], num_layers=2, num_query_heads=8,
                    num_key_value_heads=4, hidden_dim=sizes["model_dim"],
                    num_experts=experts, top_k=k)
    if family == "mixtral":
        settings.update(intermediate_dim=sizes["hidden"])
    else:
        settings.update(intermediate_dim=sizes["hidden"], moe_intermediate_dim=sizes["hidden"],
                        head_dim=sizes["model_dim"] // 8, norm_top_k_prob=True)
    keras.utils.set_random_seed(0)
    return FAMILIES[family][0](**settings)


def _pair(family: str, experts: int, k: int, sizes: Dict):
    """Two causal LMs with equal weights: keras-hub's, and one sparsified."""
    models = []
    for _ in range(2):
        backbone = _backbone(family, experts, k, sizes)
        models.append(FAMILIES[family][1](backbone=backbone, preprocessor=None))
    models[1].set_weights(models[0].get_weights())
    sparsify(models[1])
    return models


def _median_times(functions: List[Callable], steps: int) -> List[float]:
    """Median seconds of each function, run alternately after one warm-up call each."""
    for function in functions:
        function()
    times = [[] for _ in functions]
    for _ in range(steps):
        for function, record in zip(functions, times):
            start = time.perf_counter()
            function()
            record.append(time.perf_counter() - start)
    return [statistics.median(record) for record in times]


def _block_steps(block, tokens: tf.Tensor, d_outputs: tf.Tensor):
    """(forward, forward + backward) of one MoE block as tf.functions."""
    @tf.function
    def forward():
        return block(tokens)[0]

    @tf.function
    def forward_backward():
        with tf.GradientTape() as tape:
            tape.watch(tokens)
            loss = tf.reduce_sum(block(tokens, training=True)[0] * d_outputs)
        return tape.gradient(loss, [tokens] + block.trainable_weights)

    return forward, forward_backward


def _moe_block(causal_lm):
    return next(layer for layer in causal_lm.backbone._flatten_layers()
                if "MoeBlock" in type(layer).__name__ or "SparseMoE" in type(layer).__name__)


def _model_steps(causal_lm, inputs: Dict, labels: np.ndarray):
    @tf.function
    def forward():
        return causal_lm(inputs)

    @tf.function
    def forward_backward():
        with tf.GradientTape() as tape:
            logits = causal_lm(inputs, training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(
                labels, logits, from_logits=True))
        return tape.gradient(loss, causal_lm.trainable_variables)

    return forward, forward_backward


def measure(family: str, experts: int, k: int, sizes: Dict) -> Dict:
    """keras-hub's and moe_tf's times (seconds) of every measurement of one config."""
    dense, sparse = _pair(family, experts, k, sizes)
    rng = np.random.default_rng(0)
    d = sizes["model_dim"]
    tokens = tf.constant(rng.normal(size=(1, sizes["tokens"], d)), tf.float32)
    d_outputs = tf.constant(rng.normal(size=(1, sizes["tokens"], d)), tf.float32)
    blocks = [_moe_block(dense), _moe_block(sparse)]
    np.testing.assert_allclose(blocks[1](tokens)[0].numpy(), blocks[0](tokens)[0].numpy(),
                               rtol=1e-4, atol=1e-4)
    inputs = {"token_ids": rng.integers(1, sizes["vocab"],
                                        (sizes["batch"], sizes["length"])).astype("int32"),
              "padding_mask": np.ones((sizes["batch"], sizes["length"]), bool)}
    labels = np.roll(inputs["token_ids"], -1, axis=1)
    result = {"family": family, "experts": experts, "k": k}
    block_steps = [_block_steps(block, tokens, d_outputs) for block in blocks]
    model_steps = [_model_steps(model, inputs, labels) for model in (dense, sparse)]
    for index, name in enumerate(("forward", "forward_backward")):
        result[f"block_{name}"] = _median_times([s[index] for s in block_steps],
                                                sizes["steps"])
        result[f"model_{name}"] = _median_times([s[index] for s in model_steps],
                                                sizes["steps"])
    prompt_length = sizes["prompt"]
    length = prompt_length + sizes["new_tokens"]
    prompt = {"token_ids": np.zeros((sizes["batch"], length), "int32"),
              "padding_mask": np.zeros((sizes["batch"], length), bool)}
    prompt["token_ids"][:, :prompt_length] = inputs["token_ids"][:, :prompt_length]
    prompt["padding_mask"][:, :prompt_length] = True
    generated = []
    for model in (dense, sparse):
        model.compile(sampler="greedy")
        generated.append(lambda model=model: model.generate(prompt, max_length=length,
                                                            stop_token_ids=None))
    np.testing.assert_array_equal(generated[0]()["token_ids"], generated[1]()["token_ids"])
    seconds = _median_times(generated, max(2, sizes["steps"] // 2))
    new_tokens = sizes["batch"] * sizes["new_tokens"]
    result["generate_tokens_per_second"] = [new_tokens / s for s in seconds]
    return result


def format_table(results: List[Dict], sizes: Dict) -> str:
    lines = [f"Block: T = {sizes['tokens']} tokens, d = {sizes['model_dim']}, expert hidden "
             f"{sizes['hidden']} (SwiGLU). Model: 2 decoder layers, batch {sizes['batch']} x "
             f"{sizes['length']} tokens. Generation: batch {sizes['batch']}, "
             f"{sizes['new_tokens']} new tokens after {sizes['prompt']}, greedy. Times in ms "
             f"(medians, alternating); speed-up = keras-hub / moe_tf.", "",
             "| family | E | k | measurement | keras-hub | moe_tf | speed-up |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        head = f"| {r['family']} | {r['experts']} | {r['k']} |"
        for key in ("block_forward", "block_forward_backward", "model_forward",
                    "model_forward_backward"):
            dense, sparse = r[key]
            lines.append(f"{head} {key.replace('_', ' ').replace('forward backward', 'fwd+bwd')}"
                         f" | {dense * 1e3:,.1f} | {sparse * 1e3:,.1f} | "
                         f"{dense / sparse:.2f}x |")
        dense, sparse = r["generate_tokens_per_second"]
        lines.append(f"{head} generate tokens/s | {dense:,.1f} | {sparse:,.1f} | "
                     f"{sparse / dense:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="The smaller sizes.")
    args = parser.parse_args(argv)
    sizes = SIZES["quick" if args.quick else "full"]
    results = []
    for family, experts, k in CONFIGS:
        results.append(measure(family, experts, k, sizes))
        print(f"[keras_hub_bench] {family} E={experts} k={k} done", flush=True)
    print(format_table(results, sizes))


if __name__ == "__main__":
    main()
