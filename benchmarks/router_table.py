"""The routers' table: the (MoE) Transformer and the routers after the paper, compared on
equal terms with the paper's noisy top-k and the best LSTM-MoE of the language-model table.

    python -m benchmarks.router_table                          # every row, resumable
    python -m benchmarks.router_table --rows=Transformer,Switch-32
    python -m benchmarks.router_table --preset=tiny --output_dir=/tmp/r --markdown=/tmp/R.md

Every row trains `python -m train.lm` on the built-in English corpus with the same token
budget and the same ops/timestep: the 4xLSTM's of `benchmarks.lm_table` (524,288 at
model_dim 128), the attention included for the Transformers (`models.transformer`), each
row's expert (or dense FFN) hidden size solved for it. The rows: a dense Transformer;
MoE Transformers with 8, 32 and 128 experts and the paper's noisy top-2; at 32 experts the
Switch router (top-1, experts twice as wide), dynamic top-p (at most 2 experts),
expert choice (2 experts per token on average), aux-loss-free balancing (top-2 without
noise or balancing loss) and the router z-loss on top of noisy top-2; and the LSTM-MoE
with the best valid perplexity of the language-model table (MoE-256).

Each row is one subprocess in OUTPUT_DIR/<row>/ (a crash loses one row; a rerun resumes it
from its checkpoint; complete rows are skipped), `--parallel_runs` of them at a time, each
on its own share of the CPUs (`benchmarks.results_table`). After every row the results are
rewritten: OUTPUT_DIR.json, OUTPUT_DIR.png, and the Markdown between
`<!-- router_table:begin -->` and `<!-- router_table:end -->` in --markdown.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
from typing import Dict, List, Optional, Sequence, Tuple

from benchmarks import lm_table
from benchmarks.results_table import (TrainingRun, add_parallel_runs_argument,
                                      check_parallel_runs, format_number, new_figure,
                                      read_metrics, save_figure, train_and_write_table,
                                      update_markdown, write_text_atomically)
from models.lm import LanguageModelConfig, ops_per_timestep
from moe_tf import MoEConfig

MARKERS = ("<!-- router_table:begin -->", "<!-- router_table:end -->")
# The language-model table's row that stands for the LSTM-MoE (its best valid perplexity).
LSTM_ROW = "MoE-256"
BALANCE_KEYS = ("cv_importance", "max_mean_load", "experts_per_token", "dropped_fraction")


@dataclasses.dataclass(frozen=True)
class RouterRow:
    """One row: the architecture and the MoE settings `train.lm` is given (as flags of
    the same names)."""

    name: str
    architecture: str = "transformer-moe"
    moe: Tuple[Tuple[str, object], ...] = ()

    @property
    def moe_settings(self) -> Dict:
        return {"num_experts": 32, "k": 2, **dict(self.moe)}

    @property
    def directory(self) -> str:
        return self.name.lower()


ROWS = (
    RouterRow("Transformer", "transformer"),
    RouterRow("MoE-T-8", moe=(("num_experts", 8),)),
    RouterRow("MoE-T-32"),
    RouterRow("MoE-T-128", moe=(("num_experts", 128),)),
    RouterRow("Switch-32", moe=(("gating", "switch"), ("k", 1))),
    RouterRow("TopP-32", moe=(("gating", "top_p"),)),
    RouterRow("ExpertChoice-32", moe=(("gating", "expert_choice"),)),
    RouterRow("AuxLossFree-32", moe=(("bias_update_rate", 0.001), ("noisy_gating", False))),
    RouterRow("ZLoss-32", moe=(("router_z_loss_weight", 0.001),)),
    RouterRow(f"LSTM-{LSTM_ROW}", "moe"),
)
DESCRIPTIONS = {
    "Transformer": "dense FFNs, 2 x hidden wide",
    "MoE-T-8": "noisy top-2 (the paper's gating)",
    "MoE-T-32": "noisy top-2 (the paper's gating)",
    "MoE-T-128": "noisy top-2 (the paper's gating)",
    "Switch-32": "top-1, Switch loss 0.01",
    "TopP-32": "top-p, p = 0.4, at most 2, Switch loss 0.01",
    "ExpertChoice-32": "expert choice, 2 per token on average",
    "AuxLossFree-32": "top-2, selection bias (rate 0.001), no noise, no loss",
    "ZLoss-32": "noisy top-2 + router z-loss 0.001",
    f"LSTM-{LSTM_ROW}": "the LM table's best LSTM-MoE (flat top-4)",
}

# train.lm flags of each preset; `full` is the language-model table's model width and
# batches, with half its steps, so that the table trains in about two hours here.
PRESETS = {
    "full": dict(model_dim=128, batch_tokens=4096, train_steps=500, eval_every=100,
                 log_every=50, checkpoint_every=100, num_layers=2, num_heads=4,
                 max_length=64),
    "tiny": dict(preset="tiny", model_dim=32, batch_tokens=512, train_steps=6,
                 eval_every=3, log_every=3, checkpoint_every=3, max_eval_batches=2,
                 num_layers=2, num_heads=4, max_length=24),
}


def _lstm_spec() -> lm_table.ModelSpec:
    (spec,) = [spec for spec in lm_table.FAMILY if spec.name == LSTM_ROW]
    return spec


def row_config(row: RouterRow, preset: Dict, hidden_size: int) -> LanguageModelConfig:
    """The model `train.lm` builds for `row` (less the vocabulary)."""
    return LanguageModelConfig(
        architecture=row.architecture, model_dim=preset["model_dim"],
        num_layers=preset["num_layers"], num_heads=preset["num_heads"],
        moe=MoEConfig(hidden_size=hidden_size, **row.moe_settings))


def matched_hidden_size(row: RouterRow, preset: Dict) -> Tuple[int, int]:
    """The hidden size giving `row` the 4xLSTM's ops/timestep, and those ops."""
    if row.architecture == "moe":
        return lm_table.matched_hidden_size(_lstm_spec(), model_dim=preset["model_dim"])
    target = lm_table.matched_hidden_size(lm_table.FAMILY[0],
                                          model_dim=preset["model_dim"])[1]
    return lm_table.solve_hidden_size(
        lambda hidden: ops_per_timestep(row_config(row, preset, hidden),
                                        sequence_length=preset["max_length"]),
        target, high=64 * preset["model_dim"],
        refusal=f"{row.name} does not fit {target} ops/timestep: its attention and gate "
                "alone cost more.")


def _flag(name: str, value) -> str:
    if isinstance(value, bool):
        return f"--{'' if value else 'no'}{name}"
    return f"--{name}={value}"


def train_flags(row: RouterRow, *, preset: Dict, train_steps: int,
                model_dir: str) -> List[str]:
    """The `python -m train.lm` command line of one row."""
    if row.architecture == "moe":
        return lm_table.train_flags(_lstm_spec(), preset=preset, train_steps=train_steps,
                                    model_dir=model_dir)
    hidden, _ = matched_hidden_size(row, preset)
    values = dict(preset, train_steps=train_steps, model=row.architecture,
                  model_dir=model_dir, export_dir="", hidden_size=hidden,
                  **row.moe_settings)
    return [_flag(name, value) for name, value in values.items()]


def _mean_balance(balance: Dict, key: str) -> Optional[float]:
    """The mean over the MoE layers of one balance statistic of metrics.json."""
    values = [value for name, value in balance.items() if name.endswith(f"/{key}")]
    return sum(values) / len(values) if values else None


def collect_row(row: RouterRow, metrics: Dict) -> Dict:
    result = {
        "model": row.name,
        "router": DESCRIPTIONS[row.name],
        "architecture": row.architecture,
        "num_experts": (0 if row.architecture == "transformer"
                        else _lstm_spec().num_experts if row.architecture == "moe"
                        else row.moe_settings["num_experts"]),
        "ops_per_timestep": metrics["ops_per_timestep"],
        "params_excl_embedding_softmax": metrics["params_excluding_embedding_softmax"],
        "test_perplexity": metrics["test_perplexity"],
        "valid_perplexity": metrics["valid_perplexity"],
        "train_perplexity": math.exp(metrics["final_train_loss"]),
        "tokens_per_second": metrics["tokens_per_second"],
        "train_steps": metrics["global_step"],
    }
    result.update({key: _mean_balance(metrics.get("balance", {}), key)
                   for key in BALANCE_KEYS})
    return result


def _observations(rows: Sequence[Dict]) -> List[str]:
    """What the finished rows say, by valid perplexity (the test split is not used to
    choose)."""
    by_name = {row["model"]: row for row in rows}
    lines = []
    if rows:
        best = min(rows, key=lambda row: row["valid_perplexity"])
        lines.append(f"Best valid perplexity: {best['model']} "
                     f"({best['valid_perplexity']:.2f}; test {best['test_perplexity']:.2f}).")
    dense = by_name.get("Transformer")
    if dense:
        for row in rows:
            if row is not dense:
                change = row["test_perplexity"] / dense["test_perplexity"] - 1
                speed = row["tokens_per_second"] / dense["tokens_per_second"]
                lines.append(f"{row['model']}: test perplexity {change:+.1%} against the "
                             f"dense Transformer, at {speed:.2f}x its tokens/s.")
    return lines


def markdown(rows: Sequence[Dict], *, budget: str, plot_path: str,
             markdown_path: str) -> str:
    header = ("| Model | Router | Experts | ops/timestep | Params (excl. emb./softmax) | "
              "Test ppl | Valid ppl | Train ppl | tokens/s | CV(importance) | "
              "max/mean load | experts/token | dropped |")
    lines = [MARKERS[0], "", header, "|" + "---|" * 13]
    for row in rows:
        lines.append(
            f"| {row['model']} | {row['router']} | {row['num_experts'] or '-'} | "
            f"{row['ops_per_timestep']:,} | {row['params_excl_embedding_softmax']:,} | "
            f"{row['test_perplexity']:.2f} | {row['valid_perplexity']:.2f} | "
            f"{row['train_perplexity']:.2f} | {row['tokens_per_second']:,.0f} | "
            + " | ".join(format_number(row[key]) for key in BALANCE_KEYS) + " |")
    relative_plot = os.path.relpath(plot_path, os.path.dirname(os.path.abspath(
        markdown_path)))
    lines += ["", budget, "", *[f"- {line}" for line in _observations(rows)], "",
              f"![router table]({relative_plot})", "", MARKERS[1]]
    return "\n".join(lines)


def plot(rows: Sequence[Dict], path: str) -> None:
    """Test perplexity of each row, the dense Transformer as a line."""
    figure, axes = new_figure(7.0, 4.2)
    names = [row["model"] for row in rows]
    axes.barh(names, [row["test_perplexity"] for row in rows], color="tab:blue")
    for row in rows:
        if row["model"] == "Transformer":
            axes.axvline(row["test_perplexity"], color="gray", linestyle="--",
                         label="dense Transformer")
            axes.legend(fontsize="small")
    low = min(row["test_perplexity"] for row in rows)
    axes.set_xlim(low * 0.9, max(row["test_perplexity"] for row in rows) * 1.02)
    axes.invert_yaxis()
    axes.set_xlabel("test perplexity (equal ops/timestep and token budget)")
    axes.grid(True, axis="x", alpha=0.3)
    save_figure(figure, path)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", default="benchmarks/results/router_table",
                        help="Run directories; OUTPUT_DIR.json and OUTPUT_DIR.png go "
                             "beside it.")
    parser.add_argument("--markdown", default="benchmarks/RESULTS.md",
                        help="File whose router_table block is (re)written.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--train_steps", type=int, default=None,
                        help="Steps per row (default: the preset's).")
    parser.add_argument("--rows", default=",".join(row.name for row in ROWS),
                        help="Comma-separated rows to train, of: "
                             + ", ".join(row.name for row in ROWS))
    add_parallel_runs_argument(parser)
    args = parser.parse_args(argv)
    check_parallel_runs(parser, args)
    known = {row.name: row for row in ROWS}
    unknown = [name for name in args.rows.split(",") if name and name not in known]
    if unknown:
        parser.error(f"--rows: unknown {unknown}; choose from {list(known)}")
    args.selected = [known[name] for name in args.rows.split(",") if name]
    return args


def budget_text(args: argparse.Namespace, preset: Dict, steps: int) -> str:
    return (f"Budget: {steps} steps of about {preset['batch_tokens']} tokens (padding "
            f"included) for every row; preset `{args.preset}`, model_dim "
            f"{preset['model_dim']}, Transformers of {preset['num_layers']} blocks "
            f"and {preset['num_heads']} heads, attention counted over "
            f"{preset['max_length']}-token sentences.")


def write_outputs(args: argparse.Namespace, preset: Dict, steps: int, output_dir: str) -> None:
    """The table's JSON, plot and Markdown block from the rows finished so far."""
    rows = []
    for row in ROWS:
        metrics = read_metrics(os.path.join(output_dir, row.directory), steps)
        if metrics is not None:
            rows.append(collect_row(row, metrics))
    write_text_atomically(output_dir + ".json", json.dumps(rows, indent=2))
    if rows:
        plot(rows, output_dir + ".png")
    update_markdown(args.markdown, markdown(
        rows, budget=budget_text(args, preset, steps), plot_path=output_dir + ".png",
        markdown_path=args.markdown), MARKERS)


def main(argv=None) -> int:
    args = parse_args(argv)
    preset = PRESETS[args.preset]
    steps = args.train_steps or preset["train_steps"]
    output_dir = os.path.abspath(args.output_dir)
    for row in args.selected:  # every size error before any training
        matched_hidden_size(row, preset)
    runs = [TrainingRun(f"[router_table] {row.name}", os.path.join(output_dir, row.directory),
                        train_flags(row, preset=preset, train_steps=steps,
                                    model_dir=os.path.join(output_dir, row.directory)))
            for row in args.selected]
    return train_and_write_table(
        "router_table", runs, steps, parallel_runs=args.parallel_runs,
        write_outputs=lambda: write_outputs(args, preset, steps, output_dir),
        results=f"{output_dir}.json, {args.markdown}")


if __name__ == "__main__":
    sys.exit(main())
