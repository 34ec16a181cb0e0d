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
import concurrent.futures
import dataclasses
import json
import math
import os
import queue
import statistics
import subprocess
import sys
import time
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import keras
import matplotlib
import numpy as np
import tensorflow as tf
from tensorflow.core.util import event_pb2

from models.lm import LanguageModelConfig, build_language_model, ops_per_timestep
from models.special_tokens import PAD_ID
from moe_tf import MoEConfig
from train.data import text as text_data
from train.serving.trained_model import TrainedModel, restore_trained_model

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEGIN_MARKER = "<!-- lm_table:begin -->"
END_MARKER = "<!-- lm_table:end -->"
METRIC_KEYS = ("global_step", "valid_perplexity", "test_perplexity", "tokens_per_second",
               "ops_per_timestep", "params_excluding_embedding_softmax", "final_train_loss")
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


def read_metrics(model_dir: str, train_steps: int) -> Optional[Dict]:
    """The run's metrics.json if it is complete for `train_steps`, else None."""
    path = os.path.join(model_dir, "metrics.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        metrics = json.load(f)
    if any(key not in metrics for key in METRIC_KEYS) or metrics["global_step"] < train_steps:
        return None
    return metrics


def run_model(spec: ModelSpec, *, output_dir: str, preset: Dict, train_steps: int,
              cpus: Optional[Sequence[int]] = None) -> bool:
    """Trains one model in a subprocess (resuming its checkpoint); True if it completed."""
    model_dir = os.path.join(output_dir, spec.directory)
    return run_training(
        f"[lm_table] {spec.name} ({spec.directory})", model_dir,
        train_flags(spec, preset=preset, train_steps=train_steps, model_dir=model_dir),
        train_steps, cpus=cpus)


def run_training(label: str, model_dir: str, flags: List[str], train_steps: int, *,
                 cpus: Optional[Sequence[int]] = None) -> bool:
    """Runs `python -m train.lm` with `flags` in a subprocess, its output appended to
    model_dir/train.log, unless model_dir holds a run complete for `train_steps` (a
    rerun resumes a partial one from its checkpoint); True if the run is complete.

    With `cpus`, the calling thread is pinned to them, and so is the subprocess it starts
    (Linux gives a child its parent thread's CPU mask), with as many intra-op threads."""
    if read_metrics(model_dir, train_steps) is not None:
        print(f"{label}: complete, skipped", flush=True)
        return True
    os.makedirs(model_dir, exist_ok=True)
    command = [sys.executable, "-m", "train.lm", *flags]
    env = None
    where = ""
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
        env = dict(os.environ, TF_NUM_INTRAOP_THREADS=str(len(cpus)))
        where = f" on CPUs {','.join(map(str, cpus))}"
    print(f"{label}: training{where}; log {model_dir}/train.log", flush=True)
    start = time.time()
    with open(os.path.join(model_dir, "train.log"), "a", encoding="utf-8") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        # The subprocess imports train/ and models/ from this tree, not from elsewhere.
        returncode = subprocess.run(command, cwd=REPO_ROOT, stdout=log, env=env,
                                    stderr=subprocess.STDOUT, check=False).returncode
    done = returncode == 0 and read_metrics(model_dir, train_steps) is not None
    print(f"{label}: {'done' if done else f'FAILED ({returncode})'} in "
          f"{(time.time() - start) / 60:.1f} min", flush=True)
    return done


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


# ---------------------------------------------------------------- specialisation (Table 9)

class ValidPositions(NamedTuple):
    """A trained MoE language model's MoE layer and what it reads at the real (not
    padding) positions of valid-split sentences."""

    moe: keras.layers.Layer
    tokenizer: object
    inputs: np.ndarray            # float32 [positions, model_dim]: the MoE's inputs
    tokens: np.ndarray            # int [positions]: the piece read at each position
    contexts: List[Tuple[np.ndarray, int]]  # (the sentence's ids, the position)


def restore_language_model(model_dir: str) -> TrainedModel:
    """The trained `train.lm` run in `model_dir`, at its latest checkpoint."""
    return restore_trained_model(model_dir, LanguageModelConfig, build_language_model)


def valid_positions(trained: TrainedModel, num_sentences: int) -> ValidPositions:
    """Runs the first `num_sentences` valid sentences of a trained language model's run
    up to its MoE layer. A position's MoE input is the first LSTM's residual output
    after reading that piece (models.lm's wiring)."""
    model, tokenizer, run_config, _ = trained
    moe_inputs = keras.Model(model.inputs, model.get_layer("lstm_1_residual").output)
    lines = text_data.clean_lines(text_data.load_text_splits(run_config["data"]).valid)
    ids = text_data.sentence_ids(lines.take(num_sentences), tokenizer,
                                 max_length=run_config["max_length"])
    inputs, tokens, contexts = [], [], []
    for batch in ids.padded_batch(64, padded_shapes=[None]):
        states = moe_inputs(batch, training=False).numpy()
        batch = batch.numpy()
        for row, sentence in enumerate(batch):
            for position in np.flatnonzero(sentence != PAD_ID):
                inputs.append(states[row, position])
                tokens.append(sentence[position])
                contexts.append((sentence, position))
    return ValidPositions(moe=model.get_layer("moe"), tokenizer=tokenizer,
                          inputs=np.array(inputs, np.float32), tokens=np.array(tokens),
                          contexts=contexts)


def expert_specialisation(model_dir: str, *, num_sentences: int = 1000,
                          experts_shown: int = 6, contexts_shown: int = 6,
                          context_pieces: int = 5) -> Dict:
    """Routes valid-split sentences through a trained MoE language model's gate.

    For `experts_shown` experts with evenly spaced ids: the share of positions routed to
    it, its most frequent input subwords, and the distinct contexts (the preceding pieces
    and the piece at the position, in brackets) with its highest gate values (see
    `valid_positions` for what a position's gate sees). Also, over all experts that
    receive >= 20 positions, the median share of an expert's positions taken by its most
    frequent subword, against the same share for the whole split.
    """
    positions = valid_positions(restore_language_model(model_dir), num_sentences)
    tokenizer, tokens, contexts = positions.tokenizer, positions.tokens, positions.contexts
    gates = positions.moe.gate_values(positions.inputs).numpy()
    pieces = [p.decode("utf-8") for p in
              tokenizer.tokenizer.id_to_string(tf.range(tokenizer.vocab_size)).numpy()]

    def text(piece_ids) -> str:
        return "".join(pieces[i] for i in piece_ids).replace("\u2581", " ").strip()

    def piece_text(piece_id) -> str:  # a lone word-start marker stays visible
        return text([piece_id]) or pieces[piece_id]

    routed = gates > 0
    counts = routed.sum(axis=0)
    overall_top_share = np.bincount(tokens).max() / len(tokens)
    top_shares = [np.bincount(tokens[routed[:, e]]).max() / counts[e]
                  for e in range(gates.shape[1]) if counts[e] >= 20]
    experts = []
    for expert in np.unique(np.linspace(0, gates.shape[1] - 1, experts_shown).round()
                            .astype(int)):
        mine = np.flatnonzero(routed[:, expert])
        frequent = collections.Counter(tokens[mine].tolist()).most_common(5)
        best = {}  # distinct context text -> its highest gate value, best first
        for i in mine[np.argsort(-gates[mine, expert])]:
            start = max(contexts[i][1] - context_pieces, 0)
            context = (text(contexts[i][0][start:contexts[i][1]])
                       + f" [{piece_text(tokens[i])}]").strip()
            best.setdefault(context, float(gates[i, expert]))
            if len(best) == contexts_shown:
                break
        experts.append({
            "expert": int(expert),
            "share_of_positions": float(counts[expert] / len(tokens)),
            "frequent_pieces": [[piece_text(piece), n] for piece, n in frequent],
            "top_contexts": [{"gate": gate, "context": context}
                             for context, gate in best.items()],
        })
    return {"model_dir": model_dir, "sentences": num_sentences,
            "positions": int(len(tokens)),
            "median_top_piece_share": float(np.median(top_shares)) if top_shares else None,
            "overall_top_piece_share": float(overall_top_share),
            "experts": experts}


# ---------------------------------------------------------------------------- outputs

def plot(rows: Sequence[Dict], path: str) -> None:
    """Test perplexity against experts (log x); the dense baselines as horizontal lines."""
    figure, axes = plt.subplots(figsize=(6.4, 4.2))
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


def save_figure(figure, path: str) -> None:
    """Writes `figure` as a PNG to `path` (whole or not at all) and closes it."""
    figure.tight_layout()
    figure.savefig(path + ".tmp.png", dpi=120)
    plt.close(figure)
    os.replace(path + ".tmp.png", path)


def _number(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _observations(rows: Sequence[Dict]) -> List[str]:
    """Facts the table implies: MoE against the dense baselines, and overfitting."""
    lines = []
    dense = [r for r in rows if r["num_experts"] <= 1]
    moe = [r for r in rows if r["num_experts"] > 1]
    if dense and moe:
        best_dense = min(dense, key=lambda r: r["test_perplexity"])
        best_moe = min(moe, key=lambda r: r["test_perplexity"])
        change = best_moe["test_perplexity"] / best_dense["test_perplexity"] - 1
        lines.append(f"Best MoE ({best_moe['model']}, test {best_moe['test_perplexity']:.2f}) "
                     f"against the best dense baseline ({best_dense['model']}, "
                     f"{best_dense['test_perplexity']:.2f}): {change:+.1%}.")
        flat = sorted((r["num_experts"], r["test_perplexity"]) for r in moe
                      if not r["hierarchical"])
        if len(flat) > 1:
            monotone = all(b[1] < a[1] for a, b in zip(flat, flat[1:]))
            lines.append("Flat MoE test perplexity " + " -> ".join(
                f"{p:.2f} ({n})" for n, p in flat) + (": falls with every step in experts."
                                                     if monotone else
                                                     ": does not fall monotonically."))
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
                   f"{_number(r['cv_importance'])} | {_number(r['cv_load'])} | "
                   f"{_number(r['max_mean_load'])} |")
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
           f"subword: {_number(s['median_top_piece_share'], 3)} (whole split: "
           f"{_number(s['overall_top_piece_share'], 3)}).", "",
           "| expert | share of positions | most frequent subwords | contexts with the "
           "highest gate values |", "|---|---|---|---|"]
    for e in s["experts"]:
        frequent = ", ".join(f"`{p}` {n}" for p, n in e["frequent_pieces"])
        contexts = "<br>".join(f"{c['gate']:.2f}: {c['context']}".replace("|", "\\|")
                               for c in e["top_contexts"])
        out.append(f"| {e['expert']} | {e['share_of_positions']:.1%} | {frequent} | "
                   f"{contexts} |")
    return out


def replace_block(document: str, block: str,
                  markers: Tuple[str, str] = (BEGIN_MARKER, END_MARKER)) -> str:
    """`document` with the block between `markers` replaced by `block` (which starts and
    ends with them; appended when the document has none)."""
    begin, end = document.find(markers[0]), document.find(markers[1])
    if begin == -1 or end < begin:
        separator = "" if not document or document.endswith("\n\n") else (
            "\n" if document.endswith("\n") else "\n\n")
        return document + separator + block + "\n"
    return document[:begin] + block + document[end + len(markers[1]):]


def write_text_atomically(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def update_markdown(path: str, block: str,
                    markers: Tuple[str, str] = (BEGIN_MARKER, END_MARKER)) -> None:
    document = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            document = f.read()
    write_text_atomically(path, replace_block(document, block, markers))


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
    parser.add_argument("--parallel_runs", type=int, default=1,
                        help="Runs trained at a time, each on its own share of the CPUs.")
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
    cpus = len(os.sched_getaffinity(0))
    if not 1 <= args.parallel_runs <= cpus:
        parser.error(f"--parallel_runs must be between 1 and the {cpus} CPUs this process "
                     f"may use; got {args.parallel_runs}")
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


def cpu_slots(cpus: Sequence[int], parallel_runs: int) -> List[List[int]]:
    """`cpus` cut into `parallel_runs` contiguous slots, as even as they go:
    [0, 1, 2, 3, 4], 2 -> [[0, 1, 2], [3, 4]]."""
    if not 1 <= parallel_runs <= len(cpus):
        raise ValueError(f"cannot cut {len(cpus)} CPUs into {parallel_runs} slots")
    size, extra = divmod(len(cpus), parallel_runs)
    bounds = [slot * size + min(slot, extra) for slot in range(parallel_runs + 1)]
    return [list(cpus[begin:end]) for begin, end in zip(bounds, bounds[1:])]


def run_model_on_free_cpus(spec: ModelSpec, *, slots: "queue.Queue[List[int]]",
                           **run_model_kwargs) -> bool:
    """`run_model` on a slot of CPUs taken from `slots` and given back after."""
    cpus = slots.get()
    try:
        return run_model(spec, cpus=cpus, **run_model_kwargs)
    finally:
        slots.put(cpus)


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
    failed = []
    runs = run_order(args.seed_runs) + args.ablation_specs
    slots = queue.Queue()
    for cpus in cpu_slots(sorted(os.sched_getaffinity(0)), args.parallel_runs):
        slots.put(cpus)
    with concurrent.futures.ThreadPoolExecutor(args.parallel_runs) as pool:
        futures = {pool.submit(run_model_on_free_cpus, spec, slots=slots,
                               output_dir=output_dir, preset=preset, train_steps=steps): spec
                   for spec in runs}  # started in submission order
        for future in concurrent.futures.as_completed(futures):
            if not future.result():
                failed.append(futures[future].directory)
            write_outputs(args, preset, steps, output_dir)  # only this thread writes
    if not runs:
        write_outputs(args, preset, steps, output_dir)
    print(f"[lm_table] results: {output_dir}.json, {args.markdown}", flush=True)
    if failed:
        print(f"[lm_table] failed: {', '.join(failed)} (rerun to resume them)", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
