"""The paper's language-model tables (Tables 6, 7 and 9) at the scale of this machine.

    python -m benchmarks.lm_table                      # the whole table, resumable
    python -m benchmarks.lm_table --models=4xLSTM,MoE-32 --train_steps=300
    python -m benchmarks.lm_table --preset=tiny --output_dir=/tmp/t --markdown=/tmp/R.md
    python -m benchmarks.lm_table --preset=manuals     # builtin:manuals, 4x budget, seeds
    python -m benchmarks.lm_table --preset=manuals --models=MoE-256,MoE-1024-h \
        --batch_tokens=16384 --train_steps=1000 --seeded_models= --ablation_model= \
        --specialisation_model=                        # the same tokens in 4x larger steps

Table 7: the compute-matched family (4xLSTM, MoE-1-Wide, MoE-1-Deep, MoE-4, MoE-32,
MoE-256 flat with k = 4, MoE-256-h and MoE-1024-h hierarchical with 16 groups and k = 2 + 2)
trained on the built-in English corpus with the same token budget. Every model has exactly
the 4xLSTM's ops/timestep (`models.lm.ops_per_timestep`, the gate's matmuls included): each
model's expert hidden size is solved for, so models whose gate costs more get slightly
narrower experts. Table 6: the balancing-loss ablation of one MoE model. Table 9: for a few
experts of one trained MoE, the valid-split contexts with the highest gate values.

Preset `full` trains on the built-in Bible (the table of issue 7); preset `manuals` on
`builtin:manuals` (issue 19: 4x the budget, and `--seeds` runs of the `--seeded_models`,
whose row reports the mean, the standard deviation and every run). Each run is one
`python -m train.lm` subprocess in OUTPUT_DIR/<model>[_seedN]/, so a crash loses one run
only and a rerun resumes it from its checkpoint; runs whose metrics.json is complete are
skipped. Runs go seed by seed (every model's first seed before any second one), then the
ablation; `--parallel_runs=N` trains N at a time, each pinned to its own share of the
CPUs (on 2 cores two 1-core runs do 1.36x the work of one 2-core run: an LSTM step's
small matmuls do not keep two threads busy). After every finished run the results are
rewritten:
OUTPUT_DIR.json (the table: a list of objects), OUTPUT_DIR_ablation.json,
OUTPUT_DIR_specialisation.json, OUTPUT_DIR.png (test perplexity against experts) and the
Markdown between `<!-- NAME:begin -->` and `<!-- NAME:end -->` in --markdown, NAME being
OUTPUT_DIR's base name (appended if the markers are missing; the rest is kept). OUTPUT_DIR
defaults to benchmarks/results/lm_table, or lm_table_<corpus> for another corpus, with
_batch<N> appended when --batch_tokens changes the preset's (a run of another step size
is never taken for a finished one) and _<label> with --label (its spaces as underscores).
"""

import argparse
import collections
import dataclasses
import json
import math
import os
import statistics
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import tensorflow as tf
from tensorflow.core.util import event_pb2

from benchmarks.expert_specialisation import expert_specialisation
from benchmarks.results_table import (TrainingRun, add_parallel_runs_argument,
                                      check_parallel_runs, format_number, new_figure,
                                      read_metrics, save_figure, train_and_write_table,
                                      update_markdown, write_text_atomically)
from models.lm import LanguageModelConfig, ops_per_timestep
from moe_tf import MoEConfig
from train.data import text as text_data

BEGIN_MARKER = "<!-- lm_table:begin -->"
END_MARKER = "<!-- lm_table:end -->"
TABLE_KEYS = ("model", "num_experts", "hierarchical", "ops_per_timestep",
              "params_excl_embedding_softmax", "valid_perplexity", "test_perplexity",
              "tokens_per_second")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One row of Table 7 (or of the ablation): what `train.lm` is asked to build."""

    name: str
    architecture: str = "moe"
    num_experts: int = 0           # 0 for 4xLSTM; 1 for the one-expert baselines
    k: int = 4
    num_groups: int = 0            # 0: flat
    importance_weight: float = 0.1
    load_weight: float = 0.1
    seed: int = 0                  # train.lm's --seed; runs of one row differ only here

    @property
    def is_moe(self) -> bool:
        return self.architecture == "moe"

    @property
    def directory(self) -> str:
        name = self.name.lower()
        if (self.importance_weight, self.load_weight) != (0.1, 0.1):
            name += f"_wimp{self.importance_weight:g}_wload{self.load_weight:g}"
        return name + (f"_seed{self.seed}" if self.seed else "")

    def with_weights(self, importance_weight: float, load_weight: float) -> "ModelSpec":
        return dataclasses.replace(self, importance_weight=importance_weight,
                                   load_weight=load_weight)


# The paper's Table 7 family. Hierarchical layers use the paper's first-level branching of
# 16 for the 1B-word benchmark, with k = 2 at each level (4 experts per token, as flat k = 4).
FAMILY = (
    ModelSpec("4xLSTM", "4xlstm"),
    ModelSpec("MoE-1-Wide", "moe-1-wide", num_experts=1),
    ModelSpec("MoE-1-Deep", "moe-1-deep", num_experts=1),
    ModelSpec("MoE-4", num_experts=4),
    ModelSpec("MoE-32", num_experts=32),
    ModelSpec("MoE-256", num_experts=256),
    ModelSpec("MoE-256-h", num_experts=256, k=2, num_groups=16),
    ModelSpec("MoE-1024-h", num_experts=1024, k=2, num_groups=16),
)
PAPER_TEST_PERPLEXITY = {"4xLSTM": 46.0, "MoE-1-Wide": 46.1, "MoE-1-Deep": 45.7,
                         "MoE-4": 45.0, "MoE-32": 39.7, "MoE-256": 35.7, "MoE-256-h": 36.0,
                         "MoE-1024-h": 34.6}
# Table 6's rows other than (0.1, 0.1), the main configuration, whose run is reused.
DEFAULT_ABLATION = "0:0,0.2:0,0:0.2,1:1"

# The models that get `--seeds` runs (the rest one): the baselines, the flat MoE layers the
# paper's claim rests on and the largest hierarchical one.
DEFAULT_SEEDED_MODELS = "4xLSTM,MoE-1-Wide,MoE-32,MoE-256,MoE-1024-h"

# train.lm flags of each preset. `full`: the README's language model (widths of the paper
# divided by 4, batches of 4096 tokens) with a budget that trains the whole table and
# the ablation in about two hours on an idle 2-core CPU. `manuals`: the same models on the
# manuals corpus with 4x the tokens (about an hour a run on a 2-core CPU without AVX-512).
PRESETS = {
    "full": dict(model_dim=128, batch_tokens=4096, train_steps=1000, eval_every=100,
                 log_every=50, checkpoint_every=100),
    "manuals": dict(model_dim=128, batch_tokens=4096, train_steps=4000, eval_every=500,
                    log_every=50, checkpoint_every=100, data="builtin:manuals"),
    "tiny": dict(preset="tiny", model_dim=32, batch_tokens=512, train_steps=6, eval_every=3,
                 log_every=3, checkpoint_every=3, max_eval_batches=2),
}
DEFAULT_SEEDS = {"manuals": 3}  # other presets: 1


def corpus_name(preset: Dict) -> str:
    """The corpus a preset trains on, as named in file names: "en" for the default."""
    return preset.get("data", "builtin:en").partition(":")[2] or "en"


def default_output_dir(preset_name: str, preset: Dict, label: str = "") -> str:
    corpus = corpus_name(preset)
    batch = preset["batch_tokens"]
    return ("benchmarks/results/lm_table" + ("" if corpus == "en" else f"_{corpus}")
            + ("" if batch == PRESETS[preset_name]["batch_tokens"] else f"_batch{batch}")
            + ("_" + "_".join(label.split()) if label else ""))


# The flags that override a preset's budget (None: the preset's).
BUDGET_FLAGS = ("batch_tokens", "train_steps")


def budget_preset(args: argparse.Namespace) -> Dict:
    """The preset's train.lm flags with --batch_tokens and --train_steps applied."""
    overrides = {name: getattr(args, name) for name in BUDGET_FLAGS
                 if getattr(args, name) is not None}
    return dict(PRESETS[args.preset], **overrides)


def command_flags(args: argparse.Namespace) -> str:
    """The flags that name the table's budget, as its Markdown block quotes the command."""
    flags = [] if args.preset == "full" else [f"--preset={args.preset}"]
    flags += [f"--{name}={getattr(args, name)}" for name in BUDGET_FLAGS
              if getattr(args, name) is not None]
    flags += [f"--label='{args.label}'"] if args.label else []
    return "".join(f" {flag}" for flag in flags)


def block_markers(output_dir: str) -> Tuple[str, str]:
    """The Markdown markers of a table's block, named after its output directory."""
    name = os.path.basename(os.path.normpath(output_dir))
    return f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def _config(spec: ModelSpec, *, model_dim: int, hidden_size: int) -> LanguageModelConfig:
    """The model `train.lm` builds from `train_flags(spec)` (less the vocabulary)."""
    settings = dict(k=spec.k, num_groups=spec.num_groups or None, hidden_size=hidden_size,
                    importance_weight=spec.importance_weight, load_weight=spec.load_weight)
    if spec.is_moe:  # a baseline leaves --num_experts at its default
        settings.update(num_experts=spec.num_experts)
    return LanguageModelConfig(architecture=spec.architecture, model_dim=model_dim,
                               moe=MoEConfig(**settings))


def matched_hidden_size(spec: ModelSpec, *, model_dim: int) -> Tuple[int, int]:
    """The expert hidden size giving `spec` the 4xLSTM's ops/timestep, and those ops.

    ops_per_timestep grows with the hidden size, so a bisection finds the width whose ops
    are closest to the target (exactly equal for every model of FAMILY at model_dim 128).
    For 4xLSTM the hidden size is unused.

    Raises:
        ValueError: if the gate alone costs more than the budget at this model_dim.
    """
    target = ops_per_timestep(_config(FAMILY[0], model_dim=model_dim, hidden_size=1))
    if spec.architecture == "4xlstm":
        return 0, target
    return solve_hidden_size(
        lambda hidden: ops_per_timestep(_config(spec, model_dim=model_dim,
                                                hidden_size=hidden)),
        target, high=64 * model_dim,
        refusal=f"{spec.name} does not fit the 4xLSTM's {target} ops/timestep at "
                f"model_dim={model_dim}: its gate alone costs too much.")


def solve_hidden_size(ops, target: int, *, high: int, refusal: str) -> Tuple[int, int]:
    """The hidden size in [1, high] whose `ops(hidden)` (increasing) is closest to
    `target`, and those ops; ValueError(`refusal`) if even 1 costs more."""
    low = 1
    if ops(low) > target:
        raise ValueError(refusal)
    while high - low > 1:  # invariant: ops(low) <= target < ops(high)
        middle = (low + high) // 2
        low, high = (middle, high) if ops(middle) <= target else (low, middle)
    hidden = min((low, high), key=lambda h: abs(ops(h) - target))
    return hidden, ops(hidden)


def train_flags(spec: ModelSpec, *, preset: Dict, train_steps: int, model_dir: str) -> List[str]:
    """The `python -m train.lm` command line of one model."""
    hidden, _ = matched_hidden_size(spec, model_dim=preset["model_dim"])
    values = dict(preset, train_steps=train_steps, model=spec.architecture,
                  model_dir=model_dir, export_dir="", k=spec.k, seed=spec.seed,
                  importance_weight=spec.importance_weight, load_weight=spec.load_weight)
    if spec.architecture != "4xlstm":
        values.update(hidden_size=hidden)
    if spec.is_moe:
        values.update(num_experts=spec.num_experts, num_groups=spec.num_groups)
    return [f"--{name}={value}" for name, value in values.items()]


def training_run(spec: ModelSpec, *, output_dir: str, preset: Dict,
                 train_steps: int) -> TrainingRun:
    """The `train.lm` run of one model (or seed, or ablation row) in its directory."""
    model_dir = os.path.join(output_dir, spec.directory)
    return TrainingRun(
        f"[lm_table] {spec.name} ({spec.directory})", model_dir,
        train_flags(spec, preset=preset, train_steps=train_steps, model_dir=model_dir))


def read_scalars(directory: str) -> Dict[str, Dict[int, float]]:
    """Scalar TensorBoard summaries of one writer directory: {tag: {step: value}}.

    A resumed run appends a new event file; a step written twice keeps the later value.
    """
    series = collections.defaultdict(dict)
    for path in sorted(tf.io.gfile.glob(os.path.join(directory, "events.out.tfevents.*"))):
        for record in tf.data.TFRecordDataset(path):
            event = event_pb2.Event.FromString(record.numpy())
            for value in event.summary.value:
                array = tf.make_ndarray(value.tensor) if value.HasField("tensor") else None
                if array is not None and array.size == 1:  # not a histogram
                    series[value.tag][event.step] = float(array)
    return dict(series)


def _last(series: Dict[int, float]) -> Optional[float]:
    return series[max(series)] if series else None


def run_summaries(model_dir: str) -> Dict:
    """A finished run's valid-perplexity curve and the balance statistics of its last
    training window, from its TensorBoard files, kept in `model_dir/summaries.json`: the
    event files stay out of git, so a fresh checkout rebuilds the table from that file."""
    path = os.path.join(model_dir, "summaries.json")
    train = read_scalars(os.path.join(model_dir, "train"))
    valid_curve = read_scalars(os.path.join(model_dir, "eval")).get("valid_perplexity", {})
    if not train and not valid_curve and os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    summaries = {
        "valid_perplexity_curve": {str(step): value
                                   for step, value in sorted(valid_curve.items())},
        **{name: _last(train.get(f"moe/{name}", {}))
           for name in ("cv_importance", "cv_load", "max_mean_load")}}
    write_text_atomically(path, json.dumps(summaries, indent=2))
    return summaries


def collect_row(spec: ModelSpec, metrics: Dict, model_dir: str) -> Dict:
    """One result object: the table's fields, then diagnostics (train perplexity of the
    last logging window, with dropout; the valid-perplexity curve; balance statistics of
    the last logging window of training)."""
    summaries = run_summaries(model_dir)
    row = {
        "model": spec.name,
        "num_experts": spec.num_experts,
        "hierarchical": bool(spec.num_groups),
        "ops_per_timestep": metrics["ops_per_timestep"],
        "params_excl_embedding_softmax": metrics["params_excluding_embedding_softmax"],
        "valid_perplexity": metrics["valid_perplexity"],
        "test_perplexity": metrics["test_perplexity"],
        "tokens_per_second": metrics["tokens_per_second"],
        "importance_weight": spec.importance_weight,
        "load_weight": spec.load_weight,
        "seed": spec.seed,
        "train_steps": metrics["global_step"],
        "train_perplexity": math.exp(metrics["final_train_loss"]),
        "valid_perplexity_curve": summaries["valid_perplexity_curve"],
    }
    if spec.is_moe:
        row.update({name: summaries[name]
                    for name in ("cv_importance", "cv_load", "max_mean_load")})
    return row


def merge_seed_runs(runs: Sequence[Dict], *, train_tokens: int) -> Dict:
    """One row from the runs of one model that differ only in seed (the first run first):
    the first run's fields, curve and tokens/s (later seeds may have run beside others,
    `--parallel_runs`), with valid and test perplexity the means over runs, plus `seeds`,
    `test_perplexity_runs`, `test_perplexity_std` (sample standard deviation; None for one
    run) and `train_tokens` (steps x batch tokens)."""
    test = [run["test_perplexity"] for run in runs]
    return dict(
        runs[0],
        valid_perplexity=statistics.fmean(run["valid_perplexity"] for run in runs),
        test_perplexity=statistics.fmean(test),
        seeds=len(runs), test_perplexity_runs=test,
        test_perplexity_std=statistics.stdev(test) if len(test) > 1 else None,
        train_tokens=train_tokens)


def corpus_subwords(model_dir: str, data: str) -> int:
    """Subword pieces (eos included, as the model predicts them) of the training split of
    `data`, counted with the vocabulary a finished run learnt."""
    import tensorflow_text  # noqa: F401  (registers the SentencePiece ops)
    with open(os.path.join(model_dir, "subword.model"), "rb") as f:
        tokenizer = tensorflow_text.SentencepieceTokenizer(model=f.read())
    lines = text_data.clean_lines(text_data.load_text_splits(data).train)
    count = lines.batch(4096).map(lambda batch: tokenizer.tokenize(batch).row_lengths() + 1)
    return int(count.unbatch().reduce(tf.constant(0, tf.int64),
                                       lambda total, n: total + tf.cast(n, tf.int64)))


def parse_weights(text: str) -> List[Tuple[float, float]]:
    """"0:0,0.2:0" -> [(0.0, 0.0), (0.2, 0.0)] (w_importance:w_load pairs)."""
    pairs = []
    for item in filter(None, text.split(",")):
        importance, load = item.split(":")
        pairs.append((float(importance), float(load)))
    return pairs


# ---------------------------------------------------------------------------- outputs

def plot(rows: Sequence[Dict], path: str) -> None:
    """Test perplexity against experts (log x); the dense baselines as horizontal lines."""
    figure, axes = new_figure(6.4, 4.2)
    for hierarchical, marker, label in ((False, "o-", "MoE, flat k = 4"),
                                        (True, "s--", "MoE, hierarchical 2 + 2")):
        points = sorted((r["num_experts"], r["test_perplexity"]) for r in rows
                        if r["model"].startswith("MoE-") and r["num_experts"] > 1
                        and r["hierarchical"] == hierarchical)
        if points:
            axes.plot(*zip(*points), marker, label=label)
    for row, style in zip([r for r in rows if r["num_experts"] <= 1], ("-", "--", ":")):
        axes.axhline(row["test_perplexity"], color="gray", linestyle=style,
                     label=f"{row['model']} (dense)")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("experts")
    axes.set_ylabel("test perplexity")
    axes.set_title("Equal ops/timestep and token budget (built-in English)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(fontsize="small")
    save_figure(figure, path)


def _with_seeds(row: Dict) -> str:
    """A row's test perplexity and how many runs it stands for."""
    seeds = row.get("seeds", 1)
    return (f"{row['test_perplexity']:.2f}, "
            + (f"mean of {seeds} seeds" if seeds > 1 else "1 seed"))


def experts_step(fewer: Dict, more: Dict) -> str:
    """How test perplexity moves from the row with fewer experts to the one with more: a
    move smaller than the larger of the two rows' standard deviations over seeds is called
    level, since one more seed could reverse it."""
    spread = max(row.get("test_perplexity_std") or 0.0 for row in (fewer, more))
    change = more["test_perplexity"] - fewer["test_perplexity"]
    between = f"from {fewer['num_experts']} to {more['num_experts']}"
    if abs(change) < spread:
        return f"level {between} (within the seeds' standard deviation, {spread:.2f})"
    return ("falls " if change < 0 else "rises ") + between


def _observations(rows: Sequence[Dict]) -> List[str]:
    """Facts the table implies: MoE against the dense baselines, the trend in experts, and
    overfitting."""
    lines = []
    dense = [r for r in rows if r["num_experts"] <= 1]
    moe = [r for r in rows if r["num_experts"] > 1]
    if dense and moe:
        best_dense = min(dense, key=lambda r: r["test_perplexity"])
        best_moe = min(moe, key=lambda r: r["test_perplexity"])
        change = best_moe["test_perplexity"] / best_dense["test_perplexity"] - 1
        lines.append(f"Best MoE ({best_moe['model']}, test {_with_seeds(best_moe)}) against "
                     f"the best dense baseline ({best_dense['model']}, "
                     f"{_with_seeds(best_dense)}): {change:+.1%}.")
        flat = sorted((r for r in moe if not r["hierarchical"]), key=lambda r: r["num_experts"])
        if len(flat) > 1:
            steps = [experts_step(a, b) for a, b in zip(flat, flat[1:])]
            trend = ("falls with every step in experts" if all(
                step.startswith("falls") for step in steps) else ", ".join(steps))
            lines.append("Flat MoE test perplexity " + " -> ".join(
                f"{r['test_perplexity']:.2f} ({r['num_experts']})" for r in flat)
                + f": {trend}.")
    for r in rows:
        curve = {int(s): v for s, v in r["valid_perplexity_curve"].items()}
        if curve and min(curve.values()) < 0.99 * r["valid_perplexity"]:
            step = min(curve, key=curve.get)
            lines.append(f"{r['model']}: valid perplexity was {curve[step]:.2f} at step "
                         f"{step} and {r['valid_perplexity']:.2f} at the end (overfitting).")
    return lines


def _test_perplexity_cell(row: Dict) -> str:
    """Bold mean; with several seeds also the standard deviation and every run."""
    if row.get("seeds", 1) == 1:
        return f"**{row['test_perplexity']:.2f}**"
    runs = ", ".join(f"{p:.2f}" for p in row["test_perplexity_runs"])
    return (f"**{row['test_perplexity']:.2f}** ± {row['test_perplexity_std']:.2f} "
            f"({row['seeds']} seeds: {runs})")


def markdown(rows: Sequence[Dict], ablation: Sequence[Dict], specialisation: Optional[Dict],
             *, budget: str, window: int, plot_path: str, markdown_path: str,
             title: str = "## Language models at equal ops/timestep (issue 7; Tables 6, 7, 9)",
             corpus: str = "the built-in English corpus", command: str = "",
             markers: Tuple[str, str] = (BEGIN_MARKER, END_MARKER)) -> str:
    """The block between the markers: tables, plot, ablation, specialisation, facts."""
    out = [markers[0], title,
           "", f"`python -m benchmarks.lm_table{command}` (generated; resumable per run). "
           + budget,
           f"Perplexities are per subword of {corpus}, so they are not "
           "comparable with the paper's per-word 1B-word numbers (shown for the trend only). "
           f"Train perplexity: the last {window} training steps, with dropout, of the first "
           "seed. Test ppl: the mean over seeds ± their standard deviation. tokens/s: the "
           "first seed's, measured while other jobs shared the 2-core machine.", ""]
    out += _family_table(rows)
    if rows:
        relative = os.path.relpath(plot_path, os.path.dirname(os.path.abspath(markdown_path)))
        out += ["", f"![test perplexity against experts]({relative})"]
    if ablation:
        out += _ablation_table(ablation, window)
    if specialisation:
        out += _specialisation_table(specialisation)
    facts = _observations(rows)
    if facts:
        out += ["", "Observations (generated from the numbers above):", ""]
        out += [f"- {fact}" for fact in facts]
    out.append(markers[1])
    return "\n".join(out)


def _family_table(rows: Sequence[Dict]) -> List[str]:
    """Table 7's rows: one per model, seeds merged."""
    out = ["| model | experts | ops/timestep | params excl. emb. + softmax | test ppl | "
           "valid ppl | train ppl | best valid ppl (step) | tokens/s | paper test ppl |",
           "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        curve = {int(s): v for s, v in r["valid_perplexity_curve"].items()}
        best = min(curve, key=curve.get) if curve else None
        experts = r["num_experts"] or "-"
        if r["hierarchical"]:
            experts = f"{experts} (16 x {r['num_experts'] // 16})"
        out.append(
            f"| {r['model']} | {experts} | {r['ops_per_timestep']:,} | "
            f"{r['params_excl_embedding_softmax']:,} | {_test_perplexity_cell(r)} | "
            f"{r['valid_perplexity']:.2f} | {r['train_perplexity']:.2f} | "
            + (f"{curve[best]:.2f} ({best})" if curve else "-")
            + f" | {r['tokens_per_second']:,.0f} | "
            f"{PAPER_TEST_PERPLEXITY.get(r['model'], '-')} |")
    return out


def _ablation_table(ablation: Sequence[Dict], window: int) -> List[str]:
    """Table 6: the balancing losses' weights against perplexity and balance."""
    out = ["", f"### Balancing losses (Table 6, {ablation[0]['model']})", "",
           f"CV and max/mean load: the last {window} training steps (per-batch values "
           "averaged); max/mean counts the tokens each expert received.", "",
           "| w_importance | w_load | test ppl | valid ppl | CV(importance) | CV(load) "
           "| max/mean load |", "|---|---|---|---|---|---|---|"]
    for r in ablation:
        out.append(f"| {r['importance_weight']:g} | {r['load_weight']:g} | "
                   f"{r['test_perplexity']:.2f} | {r['valid_perplexity']:.2f} | "
                   f"{format_number(r['cv_importance'])} | {format_number(r['cv_load'])} | "
                   f"{format_number(r['max_mean_load'])} |")
    return out


def _specialisation_table(s: Dict) -> List[str]:
    """Table 9: what some experts receive (`expert_specialisation`'s report)."""
    out = ["", f"### Expert specialisation (Table 9, `{os.path.basename(s['model_dir'])}`)",
           "", f"{s['positions']:,} positions of {s['sentences']} valid-split sentences "
           f"routed through the trained gate (each position goes to 4 experts); experts with "
           f"evenly spaced ids. A context "
           f"is the preceding subwords and, in brackets, the subword at the position "
           f"(the gate sees the first LSTM's state after reading it). Median over "
           f"experts of the share of an expert's positions taken by its most frequent "
           f"subword: {format_number(s['median_top_piece_share'], 3)} (whole split: "
           f"{format_number(s['overall_top_piece_share'], 3)}).", "",
           "| expert | share of positions | most frequent subwords | contexts with the "
           "highest gate values |", "|---|---|---|---|"]
    for e in s["experts"]:
        frequent = ", ".join(f"`{p}` {n}" for p, n in e["frequent_pieces"])
        contexts = "<br>".join(f"{c['gate']:.2f}: {c['context']}".replace("|", "\\|")
                               for c in e["top_contexts"])
        out.append(f"| {e['expert']} | {e['share_of_positions']:.1%} | {frequent} | "
                   f"{contexts} |")
    return out


# ------------------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default=None,
                        help="Run directories; the JSON and PNG go beside it "
                             "(OUTPUT_DIR.json, OUTPUT_DIR.png, ...). Default: "
                             "benchmarks/results/lm_table[_<corpus>].")
    parser.add_argument("--markdown", default="benchmarks/RESULTS.md",
                        help="File whose block of this table is (re)written.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--train_steps", type=int, default=None,
                        help="Steps of every model (the token budget); default: preset's.")
    parser.add_argument("--batch_tokens", type=int, default=None,
                        help="Tokens per step of every model; default: preset's.")
    parser.add_argument("--label", default="",
                        help="Names a variant of the table (e.g. of its corpus's build): "
                             "appended to the default output directory and the title.")
    parser.add_argument("--models", default=",".join(s.name for s in FAMILY),
                        help="Comma-separated subset of the family, in table order.")
    parser.add_argument("--seeds", type=int, default=None,
                        help="Runs (seeds 0, 1, ...) of each --seeded_models model; "
                             "default 3 for preset manuals, else 1.")
    parser.add_argument("--seeded_models", default=DEFAULT_SEEDED_MODELS,
                        help="Models that get --seeds runs; the others get one.")
    parser.add_argument("--ablation_model", default="MoE-256",
                        help="Model of the Table 6 ablation; empty: no ablation.")
    parser.add_argument("--ablation_weights", default=DEFAULT_ABLATION,
                        help="w_importance:w_load pairs trained besides 0.1:0.1.")
    parser.add_argument("--specialisation_model", default="MoE-256",
                        help="Model of the Table 9 report; empty: none.")
    add_parallel_runs_argument(parser)
    args = parser.parse_args(argv)
    by_name = {s.name: s for s in FAMILY}
    names = [n for n in args.models.split(",") if n]
    seeded = [n for n in args.seeded_models.split(",") if n]
    for name in names + seeded + [n for n in (args.ablation_model, args.specialisation_model)
                                  if n]:
        if name not in by_name:
            parser.error(f"unknown model {name!r}; the family is {', '.join(by_name)}")
    for name in BUDGET_FLAGS:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1")
    if args.seeds is None:
        args.seeds = DEFAULT_SEEDS.get(args.preset, 1)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    check_parallel_runs(parser, args)
    if args.output_dir is None:
        args.output_dir = default_output_dir(args.preset, budget_preset(args), args.label)
    args.specs = [by_name[n] for n in names]
    args.seed_runs = {spec.name: [dataclasses.replace(spec, seed=seed) for seed in
                                  range(args.seeds if spec.name in seeded else 1)]
                      for spec in args.specs}
    args.ablation_specs = [by_name[args.ablation_model].with_weights(*weights)
                           for weights in parse_weights(args.ablation_weights)
                           ] if args.ablation_model else []
    return args


def run_order(seed_runs: Dict[str, List[ModelSpec]]) -> List[ModelSpec]:
    """Every model's first seed (table order), then every second seed, and so on: a
    partial table has each model once before any model twice."""
    depth = max((len(runs) for runs in seed_runs.values()), default=0)
    return [runs[seed] for seed in range(depth) for runs in seed_runs.values()
            if seed < len(runs)]


def table_text(args: argparse.Namespace, preset: Dict, steps: int,
               epochs: Optional[float]) -> Dict:
    """The markdown block's title, command, corpus and budget sentences for a preset."""
    corpus = corpus_name(preset)
    tokens = steps * preset["batch_tokens"]
    budget = (f"Budget: {steps} steps of about {preset['batch_tokens']} tokens (padding "
              f"included; {tokens / 1e6:.1f}M tokens) for every run; preset `{args.preset}`, "
              f"model_dim {preset['model_dim']}.")
    if epochs is not None:
        budget += f" That is {epochs:.2f} epochs of the training split."
    text = dict(budget=budget, command=command_flags(args))
    variant = ""
    if preset["batch_tokens"] != PRESETS[args.preset]["batch_tokens"]:
        variant += f", steps of {preset['batch_tokens']} tokens"
    if args.label:
        variant += f", {args.label}"
    if corpus != "en" or variant:
        text.update(corpus=f"`builtin:{corpus}`",
                    title=f"## Language models on `builtin:{corpus}` at equal ops/timestep"
                          f"{variant} (issue 19; Tables 6, 7, 9)")
    return text


def finished_runs(specs: Sequence[ModelSpec], output_dir: str, steps: int) -> List[Dict]:
    """The rows of the runs among `specs` that trained all `steps`."""
    rows = []
    for spec in specs:
        model_dir = os.path.join(output_dir, spec.directory)
        metrics = read_metrics(model_dir, steps)
        if metrics is not None:
            rows.append(collect_row(spec, metrics, model_dir))
    return rows


def training_epochs(seed_runs: Dict[str, List[ModelSpec]], output_dir: str, steps: int,
                    preset: Dict) -> Optional[float]:
    """Training epochs of one run, from the corpus's subword count (cached beside the
    results once a run has finished; None before)."""
    first = [spec for spec in run_order(seed_runs)
             if read_metrics(os.path.join(output_dir, spec.directory), steps)]
    if not first:
        return None
    cache = output_dir + "_corpus.json"
    if not os.path.exists(cache):
        subwords = corpus_subwords(os.path.join(output_dir, first[0].directory),
                                   preset.get("data", "builtin:en"))
        write_text_atomically(cache, json.dumps({"train_subwords": subwords}))
    with open(cache, encoding="utf-8") as f:
        return steps * preset["batch_tokens"] / json.load(f)["train_subwords"]


def specialisation_report(model: str, output_dir: str, steps: int) -> Optional[Dict]:
    """Table 9's report of `model`'s finished run (None before it finishes), cached
    beside the results and recomputed when the cache is of another run or fewer steps."""
    model_dir = os.path.join(output_dir, model.lower())
    metrics = read_metrics(model_dir, steps)
    if metrics is None:
        return None
    cache = output_dir + "_specialisation.json"
    if os.path.exists(cache):
        with open(cache, encoding="utf-8") as f:
            report = json.load(f)
        if (report["model_dir"], report.get("global_step")) == (model_dir,
                                                                 metrics["global_step"]):
            return report
    report = dict(expert_specialisation(model_dir), global_step=metrics["global_step"])
    write_text_atomically(cache, json.dumps(report, indent=2))
    return report


def write_outputs(args: argparse.Namespace, preset: Dict, steps: int, output_dir: str) -> None:
    """The table's JSON files, plot and Markdown block from the runs finished so far."""
    rows = []
    for runs in args.seed_runs.values():
        finished = finished_runs(runs, output_dir, steps)
        if finished and finished[0]["seed"] == 0:  # a row once its first seed is in
            rows.append(merge_seed_runs(finished, train_tokens=steps * preset["batch_tokens"]))
    ablation = finished_runs(ablation_runs(args), output_dir, steps)
    ablation.sort(key=lambda r: (r["importance_weight"], r["load_weight"]))
    specialisation = (specialisation_report(args.specialisation_model, output_dir, steps)
                      if args.specialisation_model else None)
    write_text_atomically(output_dir + ".json", json.dumps(rows, indent=2))
    write_text_atomically(output_dir + "_ablation.json", json.dumps(ablation, indent=2))
    if rows:
        plot(rows, output_dir + ".png")
    markers = block_markers(output_dir)
    update_markdown(args.markdown, markdown(
        rows, ablation, specialisation, window=preset["log_every"],
        plot_path=output_dir + ".png", markdown_path=args.markdown, markers=markers,
        **table_text(args, preset, steps,
                     training_epochs(args.seed_runs, output_dir, steps, preset))), markers)


def ablation_runs(args: argparse.Namespace) -> List[ModelSpec]:
    """Table 6's runs: the ablated model's main run (its (0.1, 0.1) row) and the others."""
    return [s for s in FAMILY if s.name == args.ablation_model] + args.ablation_specs


def main(argv=None) -> int:
    args = parse_args(argv)
    preset = budget_preset(args)
    steps = preset["train_steps"]
    output_dir = os.path.abspath(args.output_dir)
    for spec in args.specs + args.ablation_specs:  # every size error before any training
        matched_hidden_size(spec, model_dim=preset["model_dim"])
    runs = [training_run(spec, output_dir=output_dir, preset=preset, train_steps=steps)
            for spec in run_order(args.seed_runs) + args.ablation_specs]
    return train_and_write_table(
        "lm_table", runs, steps, parallel_runs=args.parallel_runs,
        write_outputs=lambda: write_outputs(args, preset, steps, output_dir),
        results=f"{output_dir}.json, {args.markdown}")


if __name__ == "__main__":
    sys.exit(main())
