"""benchmarks.lm_table: compute matching, the Markdown block, and the pipeline at --preset=tiny."""

import json
import os
import shutil
import subprocess
import sys

import pytest
from absl import flags

from benchmarks import hierarchical_probe, lm_table, results_table
from models.lm import lstm_ops
from train.training import flags as training_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_model_gets_the_4xlstm_ops_per_timestep():
    d = 128
    target = 4 * 4 * d * 2 * d  # four LSTMs of 128: 4 gates over [input, state]
    hidden = {}
    for spec in lm_table.FAMILY:
        hidden[spec.name], ops = lm_table.matched_hidden_size(spec, model_dim=d)
        assert ops == target, spec.name
    # By hand: the two LSTMs leave 2 * 4 * d * 2d for the middle; the (noisy) gate's two
    # matmuls come off it, and each of 4 experts per token costs 2 d h.
    middle = target - 2 * lstm_ops(d, d)
    assert hidden["MoE-1-Wide"] == middle // (2 * d) // 4
    assert hidden["MoE-32"] == (middle - 2 * d * 32) // (4 * 2 * d) == 248
    assert hidden["MoE-256"] == (middle - 2 * d * 256) // (4 * 2 * d) == 192
    # Hierarchical: the primary gate over 16 groups and k = 2 secondary gates over a group.
    assert hidden["MoE-256-h"] == (middle - 2 * (d * 16 + 2 * d * 16)) // (4 * 2 * d) == 244
    assert hidden["MoE-1024-h"] == (middle - 2 * (d * 16 + 2 * d * 64)) // (4 * 2 * d) == 220


def test_a_model_whose_gate_exceeds_the_budget_is_refused():
    with pytest.raises(ValueError, match="MoE-256 does not fit"):
        lm_table.matched_hidden_size(lm_table.FAMILY[5], model_dim=32)


def test_train_flags_of_an_ablation_run():
    spec = lm_table.FAMILY[6].with_weights(0.2, 0.0)
    flags = lm_table.train_flags(spec, preset=lm_table.PRESETS["full"], train_steps=7,
                                 model_dir="/x")
    assert spec.directory == "moe-256-h_wimp0.2_wload0"
    for flag in ("--model=moe", "--num_experts=256", "--num_groups=16", "--k=2",
                 "--hidden_size=244", "--importance_weight=0.2", "--load_weight=0.0",
                 "--train_steps=7", "--model_dim=128", "--model_dir=/x", "--export_dir="):
        assert flag in flags


def test_train_flags_give_train_lm_the_moe_settings_the_table_counts():
    """The MoE settings `train.lm` reads from each model's flags are those whose ops the
    hidden size was matched for (4xLSTM has no MoE)."""
    preset = lm_table.PRESETS["full"]
    for spec in lm_table.FAMILY[1:] + (lm_table.FAMILY[6].with_weights(0.2, 0.0),):
        flag_values = flags.FlagValues()
        training_flags.define_moe_flags(flag_values)
        argv = [flag for flag in lm_table.train_flags(spec, preset=preset, train_steps=7,
                                                      model_dir="/x")
                if flag[2:].split("=")[0] in training_flags.MOE_FLAGS]
        flag_values(["train.lm", *argv])
        hidden, _ = lm_table.matched_hidden_size(spec, model_dim=preset["model_dim"])
        config = lm_table._config(spec, model_dim=preset["model_dim"], hidden_size=hidden)
        assert training_flags.moe_config_from_flags(flag_values) == config.moe, spec.name


def run_table(output_dir, markdown, *flags):
    command = [sys.executable, "-m", "benchmarks.lm_table", "--preset=tiny", *flags,
               "--models=4xLSTM,MoE-4", "--ablation_model=MoE-4", "--ablation_weights=",
               "--specialisation_model=MoE-4", "--seeds=2", "--seeded_models=MoE-4",
               f"--output_dir={output_dir}",
               f"--markdown={markdown}"]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    return result.stdout


def test_tiny_table_end_to_end_and_resumed(tmp_path):
    output_dir, markdown = tmp_path / "lm_table", tmp_path / "RESULTS.md"
    markdown.write_text("# Results\n\nother section\n\n<!-- lm_table:begin -->\nstale\n"
                        "<!-- lm_table:end -->\n\n## After\n")
    # Two runs at a time, each on its own CPUs (where the machine has two).
    parallel_runs = min(2, len(os.sched_getaffinity(0)))
    stdout = run_table(output_dir, markdown, f"--parallel_runs={parallel_runs}")
    for cpus in results_table.cpu_slots(sorted(os.sched_getaffinity(0)), parallel_runs):
        assert f"training on CPUs {','.join(map(str, cpus))};" in stdout

    rows = json.loads((tmp_path / "lm_table.json").read_text())
    assert [r["model"] for r in rows] == ["4xLSTM", "MoE-4"]
    for row in rows:
        assert set(lm_table.TABLE_KEYS) <= set(row)
        assert 1 < row["test_perplexity"] < 600 and 1 < row["valid_perplexity"] < 600
        assert row["tokens_per_second"] > 0 and row["hierarchical"] is False
    assert rows[0]["ops_per_timestep"] == rows[1]["ops_per_timestep"] == 4 * 4 * 32 * 64
    assert rows[0]["num_experts"] == 0 and rows[1]["num_experts"] == 4
    assert rows[1]["params_excl_embedding_softmax"] > rows[0]["params_excl_embedding_softmax"]
    # MoE-4 ran with seeds 0 and 1 (its own directory each); its row is their mean.
    assert (rows[0]["seeds"], rows[1]["seeds"]) == (1, 2)
    runs = rows[1]["test_perplexity_runs"]
    assert runs[0] != runs[1] and rows[1]["test_perplexity"] == pytest.approx(sum(runs) / 2)
    for seed, directory in enumerate(("moe-4", "moe-4_seed1")):
        metrics = json.loads((output_dir / directory / "metrics.json").read_text())
        assert metrics["test_perplexity"] == runs[seed]
    assert rows[1]["train_tokens"] == 6 * 512

    (ablation,) = json.loads((tmp_path / "lm_table_ablation.json").read_text())
    assert (ablation["importance_weight"], ablation["load_weight"]) == (0.1, 0.1)
    assert ablation["cv_importance"] >= 0 and ablation["max_mean_load"] >= 1
    specialisation = json.loads((tmp_path / "lm_table_specialisation.json").read_text())
    assert [e["expert"] for e in specialisation["experts"]] == [0, 1, 2, 3]
    assert all(e["top_contexts"] for e in specialisation["experts"])
    assert (tmp_path / "lm_table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # The routing probe reads the same trained run (a flat gate: one level).
    probe = hierarchical_probe.probe_run(str(output_dir / "moe-4"), num_sentences=8)
    assert probe["num_experts"] == 4 and probe["num_groups"] == 0 and probe["positions"] > 8
    # k = 4 of 4 experts: Load is constant, Importance still depends on both weights.
    assert set(probe["routing"]) == {"experts"} and set(probe["gradients"]["importance"]) == {
        "w_gate", "w_noise"}
    perplexity = probe["valid_perplexity"]
    assert 1 < perplexity["served"] < 600 and 1 < perplexity["with_training_noise"] < 600
    assert "| moe-4 | experts |" in hierarchical_probe.markdown([probe])

    text = markdown.read_text()
    assert "stale" not in text and "other section" in text and text.endswith("## After\n")
    assert text.count(lm_table.BEGIN_MARKER) == text.count(lm_table.END_MARKER) == 1
    assert "| MoE-4 | 4 | 32,768 |" in text and "(lm_table.png)" in text
    assert f"± {rows[1]['test_perplexity_std']:.2f} (2 seeds: {runs[0]:.2f}, " in text
    corpus = json.loads((tmp_path / "lm_table_corpus.json").read_text())
    assert f"{6 * 512 / corpus['train_subwords']:.2f} epochs" in text
    assert "### Balancing losses" in text and "### Expert specialisation" in text

    metrics = output_dir / "moe-4" / "metrics.json"
    written = metrics.stat().st_mtime_ns
    stdout = run_table(output_dir, markdown)
    assert stdout.count("complete, skipped") == 3 and "training" not in stdout
    assert metrics.stat().st_mtime_ns == written
    assert markdown.read_text() == text

    # A fresh checkout lacks the TensorBoard files (not committed): the same rows again.
    assert rows[1]["valid_perplexity_curve"] and rows[1]["cv_load"] is not None
    for run_directory in output_dir.iterdir():
        for events in ("train", "eval"):
            shutil.rmtree(run_directory / events, ignore_errors=True)
    run_table(output_dir, markdown)
    assert json.loads((tmp_path / "lm_table.json").read_text()) == rows


def test_merge_seed_runs_reports_mean_spread_and_runs():
    runs = [dict(model="MoE-32", test_perplexity=p, valid_perplexity=v, tokens_per_second=t,
                 valid_perplexity_curve={"1": v}) for p, v, t in
            ((50.0, 51.0, 100.0), (52.0, 53.0, 200.0), (54.5, 55.0, 300.0))]
    row = lm_table.merge_seed_runs(runs, train_tokens=4096)
    assert row["test_perplexity"] == pytest.approx(52.1666666667)
    assert row["valid_perplexity"] == pytest.approx(53.0)
    assert row["test_perplexity_std"] == pytest.approx(2.2546248764)  # sample std
    assert row["test_perplexity_runs"] == [50.0, 52.0, 54.5] and row["seeds"] == 3
    # tokens/s is the first seed's: later seeds may have shared the CPUs (--parallel_runs).
    assert row["tokens_per_second"] == 100.0 and row["train_tokens"] == 4096
    assert row["valid_perplexity_curve"] == {"1": 51.0}  # the first seed's
    assert lm_table.merge_seed_runs(runs[:1], train_tokens=1)["test_perplexity_std"] is None


def _row(model, experts, test, std=None, seeds=1):
    return dict(model=model, num_experts=experts, hierarchical=False, test_perplexity=test,
                test_perplexity_std=std, seeds=seeds, test_perplexity_runs=[test] * seeds,
                valid_perplexity=test, valid_perplexity_curve={}, train_perplexity=test,
                ops_per_timestep=1, params_excl_embedding_softmax=1, tokens_per_second=1.0)


def test_a_step_in_experts_within_the_seeds_spread_is_called_level():
    four, moe32 = _row("MoE-4", 4, 97.51), _row("MoE-32", 32, 92.09, 0.70, 2)
    moe256 = _row("MoE-256", 256, 92.08, 0.94, 2)
    assert lm_table.experts_step(four, moe32) == "falls from 4 to 32"
    assert lm_table.experts_step(moe32, moe256) == (
        "level from 32 to 256 (within the seeds' standard deviation, 0.94)")
    # One seed each: no spread to judge by, so the sign decides.
    assert lm_table.experts_step(_row("a", 32, 92.09), _row("b", 256, 92.10)) == (
        "rises from 32 to 256")
    dense = _row("4xLSTM", 0, 97.29, 0.20, 2)
    text = lm_table.markdown([dense, four, moe32, moe256], [], None, budget="", window=50,
                             plot_path="t.png", markdown_path="RESULTS.md")
    assert ("Flat MoE test perplexity 97.51 (4) -> 92.09 (32) -> 92.08 (256): falls from 4 "
            "to 32, level from 32 to 256 (within the seeds' standard deviation, 0.94).") in text
    assert ("Best MoE (MoE-256, test 92.08, mean of 2 seeds) against the best dense baseline "
            "(4xLSTM, 97.29, mean of 2 seeds): -5.4%.") in text
    moe256["test_perplexity"] = 90.0
    assert "97.51 (4) -> 92.09 (32) -> 90.00 (256): falls with every step in experts." in (
        lm_table.markdown([dense, four, moe32, moe256], [], None, budget="", window=50,
                          plot_path="t.png", markdown_path="RESULTS.md"))


def test_runs_go_seed_by_seed_and_each_seed_has_its_directory():
    args = lm_table.parse_args(["--preset=manuals", "--models=4xLSTM,MoE-4,MoE-32"])
    assert args.seeds == 3 and args.output_dir == "benchmarks/results/lm_table_manuals"
    assert [(spec.directory, spec.seed) for spec in lm_table.run_order(args.seed_runs)] == [
        ("4xlstm", 0), ("moe-4", 0), ("moe-32", 0), ("4xlstm_seed1", 1), ("moe-32_seed1", 1),
        ("4xlstm_seed2", 2), ("moe-32_seed2", 2)]
    flags = lm_table.train_flags(args.seed_runs["MoE-32"][2], preset=lm_table.PRESETS[
        "manuals"], train_steps=4000, model_dir="/tmp/x")
    assert "--seed=2" in flags and "--data=builtin:manuals" in flags
    assert lm_table.block_markers(args.output_dir) == ("<!-- lm_table_manuals:begin -->",
                                                      "<!-- lm_table_manuals:end -->")
    assert lm_table.parse_args([]).output_dir == "benchmarks/results/lm_table"
    assert lm_table.block_markers("benchmarks/results/lm_table") == (
        lm_table.BEGIN_MARKER, lm_table.END_MARKER)


def test_a_larger_step_trains_the_same_tokens_in_a_directory_of_its_own():
    args = lm_table.parse_args(["--preset=manuals", "--models=MoE-256",
                                "--batch_tokens=16384", "--train_steps=1000"])
    assert args.output_dir == "benchmarks/results/lm_table_manuals_batch16384"
    preset = lm_table.budget_preset(args)
    flags = lm_table.train_flags(args.seed_runs["MoE-256"][0], preset=preset,
                                 train_steps=preset["train_steps"], model_dir="/tmp/x")
    assert "--batch_tokens=16384" in flags and "--train_steps=1000" in flags
    text = lm_table.table_text(args, preset, preset["train_steps"], epochs=None)
    assert text["command"] == " --preset=manuals --batch_tokens=16384 --train_steps=1000"
    assert "1000 steps of about 16384 tokens (padding included; 16.4M tokens)" in text["budget"]
    assert text["title"] == ("## Language models on `builtin:manuals` at equal ops/timestep,"
                             " steps of 16384 tokens (issue 19; Tables 6, 7, 9)")
    # the preset's own step size keeps the table's directory
    assert lm_table.parse_args(["--preset=manuals", "--batch_tokens=4096"]).output_dir == (
        "benchmarks/results/lm_table_manuals")
    with pytest.raises(SystemExit):
        lm_table.parse_args(["--batch_tokens=0"])


def test_a_labelled_table_has_its_own_directory_and_title():
    args = lm_table.parse_args(["--preset=manuals", "--label=interleaved pages"])
    assert args.output_dir == "benchmarks/results/lm_table_manuals_interleaved_pages"
    text = lm_table.table_text(args, lm_table.budget_preset(args), 4000, epochs=None)
    assert text["title"] == ("## Language models on `builtin:manuals` at equal ops/timestep,"
                             " interleaved pages (issue 19; Tables 6, 7, 9)")
    assert text["command"] == " --preset=manuals --label='interleaved pages'"
    assert lm_table.block_markers(args.output_dir)[0] == (
        "<!-- lm_table_manuals_interleaved_pages:begin -->")
    unlabelled = lm_table.parse_args(["--preset=manuals"])
    assert "title" in lm_table.table_text(unlabelled, lm_table.budget_preset(unlabelled),
                                          4000, epochs=None)
    bible = lm_table.parse_args([])
    assert "title" not in lm_table.table_text(bible, lm_table.budget_preset(bible), 1000,
                                              epochs=None)  # the issue-7 table's own
