"""Why a hierarchical MoE lags (issue 19 part 3): routing probes of trained language models.

    python -m benchmarks.hierarchical_probe \
        --model_dir=benchmarks/results/hierarchical_probe/moe-1024-h \
        --model_dir=benchmarks/results/hierarchical_probe/moe-256-h --json=probe.json

For each trained `train.lm` run (flat or hierarchical MoE) it routes valid-split positions
through the restored gate and reports, per gating level (the flat gate is one level; a
hierarchical gate has the primary gate over groups and the secondary gates inside them):

- balance of the routing the model serves with (no noise): the share of experts (groups)
  that no position reaches, the effective share (exp(entropy) of the assignment shares
  over their number), CV and max/mean of the positions each receives, and the busiest
  tenth's share of all assignments;
- how decisive the level is: the mean top gate among the chosen ones, and the margin
  between the k-th and (k+1)-th clean logit over the training noise's standard deviation
  (below ~1 the noise, not the input, picks the experts during training);
- the gate weights' RMS (every gate weight starts at zero, Appendix A);
- the balancing loss's gradient (the training-mode gate on a batch of those positions):
  the RMS of d CV(Importance)^2 / dW and d CV(Load)^2 / dW per weight, and for a
  hierarchical gate the share of the secondary gates that Load_H's gradient reaches;
- the valid perplexity routed as served and routed with the training noise.
"""

import argparse
import contextlib
import json
import math
import sys
from typing import Dict, List, Optional

import numpy as np
import tensorflow as tf

from benchmarks.expert_specialisation import restore_language_model, valid_positions
from benchmarks.results_table import write_text_atomically
from moe_tf import gating
from train.data import text as text_data
from train.serving.lm import LanguageModelServer
from train.serving.trained_model import TrainedModel


def count_statistics(counts: np.ndarray) -> Dict[str, float]:
    """Balance of `counts` `[n]` (positions each expert or group received)."""
    counts = np.asarray(counts, np.float64)
    mean = counts.mean()
    busiest = np.sort(counts)[::-1][:max(1, len(counts) // 10)]
    share = counts[counts > 0] / counts.sum() if mean else np.ones(1)
    return {"unused": float(np.mean(counts == 0)),
            # exp(entropy of the shares) / n: 1 when all are used alike.
            "effective": float(np.exp(-np.sum(share * np.log(share))) / len(counts)),
            "cv": float(counts.std() / mean) if mean else 0.0,
            "max_mean": float(counts.max() / mean) if mean else 0.0,
            "busiest_tenth_share": float(busiest.sum() / counts.sum()) if mean else 0.0}


def routing_statistics(gates: np.ndarray, num_groups: int = 0) -> Dict[str, Dict]:
    """Balance and decisiveness of served routing.

    Args:
        gates: `[positions, experts]` dense gates (0 where not routed); expert (i, j) of a
            hierarchical layer is column i * experts_per_group + j.
        num_groups: the primary gate's groups; 0 for a flat gate.

    Returns:
        {"experts": ..., and for a hierarchical layer "groups": ... and
        "within_groups": the mean over groups of their experts' CV}; each level's
        `top_gate` is the mean over positions of its largest chosen gate as a share of
        the level's chosen gates (1 / k when the chosen gates are equal).
    """
    routed = gates > 0
    result = {"experts": count_statistics(routed.sum(axis=0))}
    if not num_groups:
        result["experts"]["top_gate"] = float(np.mean(gates.max(axis=1)
                                                      / gates.sum(axis=1)))
        return result
    positions, experts = gates.shape
    by_group = gates.reshape(positions, num_groups, experts // num_groups)
    group_gates = by_group.sum(axis=2)                           # Gp(x)_i, chosen groups
    result["groups"] = count_statistics((group_gates > 0).sum(axis=0))
    result["groups"]["top_gate"] = float(np.mean(group_gates.max(axis=1)
                                                 / group_gates.sum(axis=1)))
    chosen = group_gates > 0                                     # [positions, groups]
    within = by_group[chosen] / group_gates[chosen][:, None]     # G_i(x), chosen groups
    result["experts"]["top_gate"] = float(np.mean(within.max(axis=1)))
    per_group = routed.reshape(positions, num_groups, -1).sum(axis=0)  # [groups, e]
    result["within_groups"] = {"cv": float(np.mean(
        [count_statistics(row)["cv"] for row in per_group]))}
    return result


def _margin_over_noise(clean: np.ndarray, noise_std: Optional[np.ndarray],
                       k: int) -> Optional[float]:
    """Mean over rows of (k-th - (k+1)-th largest clean logit) / the row's mean noise
    std; `clean`, `noise_std` `[rows, choices]`. None without noise or k = choices."""
    if noise_std is None or clean.shape[-1] <= k:
        return None
    ranked = -np.sort(-clean, axis=-1)
    return float(np.mean((ranked[:, k - 1] - ranked[:, k]) / noise_std.mean(axis=-1)))


def level_margins(gate, inputs: np.ndarray) -> Dict[str, Optional[float]]:
    """`_margin_over_noise` of each level of a trained noisy top-k gate on `inputs`
    `[positions, d]`; a hierarchical gate's secondary level over each position's
    chosen groups (chosen by clean primary logits, as at inference)."""
    def noise(weights):
        if weights is None:
            return None
        return gating.noise_stddev(inputs @ weights.numpy(), gate.noise_epsilon).numpy()

    w_noise = getattr(gate, "w_noise", None)
    primary = inputs @ gate.w_gate.numpy()
    if not hasattr(gate, "num_groups"):
        return {"experts": _margin_over_noise(primary, noise(w_noise), gate.k)}
    chosen = np.argsort(-primary, axis=1)[:, :gate.group_k]            # [positions, gk]

    def secondary(weights):
        if weights is None:
            return None
        logits = np.einsum("td,gde->tge", inputs, weights.numpy())
        return np.take_along_axis(logits, chosen[..., None], axis=1).reshape(
            -1, gate.experts_per_group)

    secondary_noise = secondary(gate.w_noise_secondary)
    if secondary_noise is not None:
        secondary_noise = gating.noise_stddev(secondary_noise, gate.noise_epsilon).numpy()
    return {"groups": _margin_over_noise(primary, noise(w_noise), gate.group_k),
            "experts": _margin_over_noise(secondary(gate.w_gate_secondary),
                                          secondary_noise, gate.k)}


def _rms(values) -> float:
    return float(np.sqrt(np.mean(np.square(values))))


def balancing_gradients(gate, inputs: np.ndarray) -> Dict[str, Dict[str, float]]:
    """RMS of the gradients of CV(Importance)^2 and CV(Load)^2 with respect to each of
    the gate's weights, the training-mode gate (noise included) applied to `inputs`
    `[tokens, d]`; for a hierarchical gate also `secondary_groups_reached`, the share of
    secondary gates whose `w_gate_secondary` slice gets a non-zero Load gradient."""
    inputs = tf.constant(inputs)
    with tf.GradientTape(persistent=True) as tape:
        output = gate(inputs, training=True)
        terms = {"importance": gating.cv_squared(output.importance),
                 "load": gating.cv_squared(output.load)}
    result = {}
    for name, term in terms.items():
        grads = tape.gradient(term, gate.trainable_weights)
        result[name] = {weight.path.split("/")[-1]: _rms(grad.numpy())
                        for weight, grad in zip(gate.trainable_weights, grads)
                        if grad is not None}
    if hasattr(gate, "num_groups"):
        grad = tape.gradient(terms["load"], gate.w_gate_secondary)
        result["secondary_groups_reached"] = 0.0 if grad is None else float(np.mean(
            np.abs(grad.numpy()).reshape(gate.num_groups, -1).max(axis=1) > 0))
    return result


@contextlib.contextmanager
def noisy_routing(gate):
    """Within the block, `gate` routes with its training noise in every call (nothing
    else of the model changes: no dropout, no balancing loss)."""
    call = gate.call

    def noisy_call(inputs, *, training=None, token_mask=None):
        del training
        return call(inputs, training=True, token_mask=token_mask)

    gate.call = noisy_call
    try:
        yield
    finally:
        del gate.call  # the class's own again


def routing_perplexities(trained: TrainedModel, num_sentences: int,
                         noisy_samples: int = 3) -> Dict[str, float]:
    """Perplexity of a trained language model's first `num_sentences` valid sentences
    routed as served (clean logits) and routed with the training noise (the mean NLL
    over `noisy_samples` draws). Lower with noise: the served routing is not the one the
    experts trained on."""
    model, tokenizer, run_config, config = trained
    lines = text_data.clean_lines(text_data.load_text_splits(run_config["data"]).valid)
    batches = list(lines.take(num_sentences).batch(64))

    def mean_nll():
        # A new server traces its scoring function with the gate as it is now.
        server = LanguageModelServer(model, config, tokenizer, run_config["max_length"])
        scores = [server.score(batch) for batch in batches]
        log_prob = sum(float(tf.reduce_sum(s["log_prob"])) for s in scores)
        return -log_prob / sum(int(tf.reduce_sum(s["num_tokens"])) for s in scores)

    served = mean_nll()
    with noisy_routing(model.get_layer("moe").gate):
        noisy = float(np.mean([mean_nll() for _ in range(noisy_samples)]))
    return {"served": math.exp(served), "with_training_noise": math.exp(noisy)}


def probe_run(model_dir: str, *, num_sentences: int = 1000,
              gradient_tokens: int = 4096) -> Dict:
    """Every probe of the module docstring for one trained run."""
    trained = restore_language_model(model_dir)
    positions = valid_positions(trained, num_sentences)
    gate = positions.moe.gate
    num_groups = getattr(gate, "num_groups", 0)
    gates = positions.moe.gate_values(positions.inputs).numpy()
    return {
        "model_dir": model_dir,
        "positions": int(len(positions.inputs)),
        "num_experts": int(gates.shape[1]),
        "num_groups": int(num_groups),
        "routing": routing_statistics(gates, num_groups),
        "margin_over_noise": level_margins(gate, positions.inputs),
        "weight_rms": {weight.path.split("/")[-1]: _rms(weight.numpy())
                       for weight in gate.trainable_weights},
        "gradients": balancing_gradients(gate, positions.inputs[:gradient_tokens]),
        "valid_perplexity": routing_perplexities(trained, num_sentences),
    }


def _number(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def markdown(results: List[Dict]) -> str:
    """One table row per (run, level), then one per run of perplexities."""
    lines = ["| run | level | unused | effective | CV | max/mean | busiest tenth | top gate | "
             "margin / noise | w_gate RMS | d CV(Load)^2 / d w_gate RMS |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        name = result["model_dir"].rstrip("/").split("/")[-1]
        hierarchical = bool(result["num_groups"])
        for level in (("groups", "experts") if hierarchical else ("experts",)):
            stats = result["routing"][level]
            suffix = "_secondary" if hierarchical and level == "experts" else ""
            lines.append(
                f"| {name} | {level} | {stats['unused']:.1%} | {stats['effective']:.1%} | "
                f"{stats['cv']:.2f} | "
                f"{stats['max_mean']:.2f} | {stats['busiest_tenth_share']:.1%} | "
                f"{stats['top_gate']:.2f} | "
                f"{_number(result['margin_over_noise'][level])} | "
                f"{_number(result['weight_rms'].get('w_gate' + suffix))} | "
                f"{_number(result['gradients']['load'].get('w_gate' + suffix))} |")
    lines += ["", "| run | valid positions | perplexity, routed as served | "
              "with the training noise |", "|---|---|---|---|"]
    for result in results:
        name = result["model_dir"].rstrip("/").split("/")[-1]
        perplexity = result["valid_perplexity"]
        lines.append(f"| {name} | {result['positions']} | {perplexity['served']:.2f} | "
                     f"{perplexity['with_training_noise']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", action="append", required=True,
                        help="A trained train.lm MoE run (repeatable).")
    parser.add_argument("--num_sentences", type=int, default=1000)
    parser.add_argument("--json", default=None, help="Also write the results here.")
    args = parser.parse_args(argv)
    results = [probe_run(model_dir, num_sentences=args.num_sentences)
               for model_dir in args.model_dir]
    if args.json:
        write_text_atomically(args.json, json.dumps(results, indent=2) + "\n")
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
