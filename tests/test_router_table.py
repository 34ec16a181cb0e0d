"""benchmarks.router_table: every row at the 4xLSTM's ops/timestep, the flags that
`train.lm` reads, and the pipeline at --preset=tiny."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
from absl import flags

from benchmarks import lm_table, router_table
from train import lm as train_lm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("preset", ["full", "tiny"])
def test_every_row_gets_the_4xlstm_ops_per_timestep(preset):
    settings = router_table.PRESETS[preset]
    target = lm_table.matched_hidden_size(lm_table.FAMILY[0],
                                          model_dim=settings["model_dim"])[1]
    for row in router_table.ROWS:
        if row.architecture == "moe" and preset == "tiny":
            with pytest.raises(ValueError, match="gate alone costs too much"):
                router_table.matched_hidden_size(row, settings)
            continue
        hidden, ops = router_table.matched_hidden_size(row, settings)
        assert abs(ops / target - 1) < 0.01, (row.name, ops, target)
    # Switch: one expert per token, about twice as wide as top-2's.
    switch = dict((row.name, router_table.matched_hidden_size(row, settings)[0])
                  for row in router_table.ROWS if row.architecture != "moe")
    assert 1.9 < switch["Switch-32"] / switch["MoE-T-32"] < 2.1


def test_train_flags_give_train_lm_the_model_the_table_counts():
    """The model config `train.lm` builds from each row's flags is the one whose ops the
    hidden size was matched for."""
    preset = router_table.PRESETS["full"]
    for row in router_table.ROWS:
        if row.architecture == "moe":
            continue
        flag_values = flags.FlagValues()
        train_lm.define_flags(flag_values)
        flag_values(["train.lm", *router_table.train_flags(
            row, preset=preset, train_steps=7, model_dir="/x")])
        hidden, _ = router_table.matched_hidden_size(row, preset)
        config = train_lm.model_config(flag_values)
        want = router_table.row_config(row, preset, hidden)
        assert config == dataclasses.replace(want, vocab_size=config.vocab_size), row.name


def test_tiny_table_end_to_end(tmp_path):
    output_dir, markdown = tmp_path / "router_table", tmp_path / "RESULTS.md"
    markdown.write_text("# Results\n\n<!-- lm_table:begin -->\nkept\n<!-- lm_table:end -->\n")
    command = [sys.executable, "-m", "benchmarks.router_table", "--preset=tiny",
               "--rows=Switch-32", f"--output_dir={output_dir}", f"--markdown={markdown}"]

    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    (row,) = json.loads((tmp_path / "router_table.json").read_text())
    assert row["model"] == "Switch-32" and row["experts_per_token"] == 1.0
    assert 1 < row["test_perplexity"] < 600 and row["tokens_per_second"] > 0
    assert row["cv_importance"] >= 0 and row["max_mean_load"] >= 1
    assert (tmp_path / "router_table.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = markdown.read_text()
    assert "kept" in text and "| Switch-32 | top-1" in text
    assert text.count(router_table.MARKERS[0]) == 1
    # (A rerun skips complete rows: results_table.run_training, tested in
    # test_lm_table.py.)
