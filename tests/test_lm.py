"""The language-model binary end to end: data sources, resume, serving, flags."""

import glob
import gzip
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tests.binary_runner import (check_refused, command_lines_fixture,
                                 refused_setups_fixture, run_command_lines)
from tests.saved_model_runner import serve_in_fresh_process

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TFDS_MOCK_RUNNER = os.path.join(os.path.dirname(__file__), "tfds_mock_runner.py")


def lm_command(model_dir, *flags):
    return [sys.executable, "-m", "train.lm", "--preset=tiny", f"--model_dir={model_dir}",
            *flags]


def run(command, timeout=300, env=None):
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                            timeout=timeout, env=env)
    return result


def run_ok(command, timeout=300, env=None):
    result = run(command, timeout, env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def left_in(directory):
    """What processes left in `directory`, their TMPDIR, apart from AutoGraph's files
    (removed at exit, unless a process ends by os._exit, as the DTensor ones do)."""
    return [name for name in os.listdir(directory)
            if not name.startswith("__autograph_generated_file")]


def metrics(model_dir):
    with open(os.path.join(model_dir, "metrics.json")) as f:
        return json.load(f)


def check_metrics(values, steps):
    assert values["global_step"] == steps
    for key in ("final_train_loss", "valid_perplexity", "test_perplexity",
                "tokens_per_second"):
        assert np.isfinite(values[key]) and values[key] > 0, key
    assert values["params_excluding_embedding_softmax"] > 0
    assert values["ops_per_timestep"] > 0


def write_corpus(path, lines):
    with open(path, "wb") as f:
        f.write(b"\n".join(lines) + b"\n")


def test_tfds_lm1b_source_with_mock_data(tmp_path):
    # 64 mock sentences of random words: fewer than 512 subwords.
    run_ok([sys.executable, TFDS_MOCK_RUNNER, "--preset=tiny", "--data=tfds:lm1b",
            f"--model_dir={tmp_path}", "--vocab_size=128", "--train_steps=4",
            "--export_dir="])
    check_metrics(metrics(tmp_path), 4)


# Tiny runs of both built-in corpora, every other architecture and every router through
# the binary, in one process; each line has its --model_dir under the fixture's directory.
# The Transformer with an MoE is trained 3 steps, exported, and resumed to 5.
TRANSFORMER_MOE = ("--model=transformer-moe --num_layers=2 --model_dir={tmp}/transformer_moe "
                   "--export_dir={tmp}/transformer_moe/export")
TINY_RUNS = {
    "--data=builtin:es": 2.0,
    **{f"--model={model}": 1.0 for model in ("4xlstm", "moe-1-wide", "moe-1-deep")},
    "--model=transformer --num_layers=2": 1.0,
    "--model=transformer-moe --num_layers=2 --gating=switch --k=1": 1.0,
    "--model=transformer-moe --num_layers=2 --gating=top_p --top_p_threshold=0.5": 2.0,
    "--model=transformer-moe --num_layers=2 --gating=expert_choice --dispatch=capacity "
    "--capacity_group_size=64": 2.0,
    "--model=transformer-moe --num_layers=2 --bias_update_rate=0.01 "
    "--router_z_loss_weight=0.001": 2.0,
    # Mixtral's block: softmax top-k routing, SwiGLU experts without biases.
    "--model=transformer-moe --num_layers=2 --gating=softmax_top_k --gated_experts=glu "
    "--expert_activation=silu --expert_bias=false": 2.0,
}  # flags -> the most experts per token (4 experts, k = 2 in the tiny preset)
# Then the finished run once more with int8 experts: it resumes at its last step, trains
# nothing, and writes that export.
INT8_EXPORT = ("--train_steps=5 --export_expert_dtype=int8 "
               "--export_dir={tmp}/transformer_moe/int8")
# Then runs that read files of their own (`write_run_inputs`), or that a second command
# line resumes: name -> (their --model_dir under the fixture's directory, flags).
CAPACITY_XLA = ("--dispatch=capacity --capacity_factor=1.0 --train_steps=6 "
                "--length_multiple=8 --max_eval_batches=2 --dropout=0 --nonoisy_gating")
RUNS = {
    "corrupt lines": ("corrupt", "--data=text:{tmp}/corrupt.txt --train_steps=6"),
    "held-out files": ("held_out", "--data=text:{tmp}/train.txt --valid_data={tmp}/valid.txt "
                                   "--test_data={tmp}/test.txt --train_steps=4"),
    "factored adam": ("factored", "--train_steps=4 --optimizer=factored_adam "
                                  "--gating=balanced"),
    "factored adam, resumed with adam": ("factored", "--train_steps=4 --gating=balanced"),
    "legacy": ("legacy", "--train_steps=2"),
    "legacy, resumed with k = 1": ("legacy", "--train_steps=2 --k=1"),
    # Lengths padded to multiples of 8: fewer batch shapes for XLA to compile.
    "capacity": ("capacity", f"{CAPACITY_XLA} --nojit_compile"),
    "capacity under XLA": ("capacity_xla", f"{CAPACITY_XLA} --jit_compile"),
}
CORRUPT_LINES = [b"", b"   ", b"caf\xe9 latin-1 bytes", b"\xff\xfe broken", b""]


def run_line(model_dir, flags):
    return [*flags.split(), f"--model_dir={{tmp}}/{model_dir}"]


def write_run_inputs(tmp):
    """The files RUNS read: a corpus with corrupt lines, one with held-out files of its
    own, and a run directory recorded before MoEConfig."""
    with gzip.open(os.path.join(ROOT, "train/data/bible/en.train.txt.gz"), "rb") as f:
        good = f.read().splitlines()[:1500]
    write_corpus(tmp / "corrupt.txt",
                 good[:700] + CORRUPT_LINES[:3] + good[700:] + CORRUPT_LINES[3:])
    with gzip.open(os.path.join(ROOT, "train/data/bible/es.train.txt.gz"), "rb") as f:
        lines = f.read().splitlines()[:1200]
    write_corpus(tmp / "train.txt", lines[:1000])
    write_corpus(tmp / "valid.txt", lines[1000:1100])
    write_corpus(tmp / "test.txt", lines[1100:])
    (tmp / "legacy").mkdir()
    (tmp / "legacy" / "run_config.json").write_text(json.dumps(LEGACY_RUN_CONFIG))


tiny_runs = command_lines_fixture(
    "train.lm", ["--preset=tiny", "--train_steps=3", "--log_every=1", "--export_dir="],
    [run_line(i, flags) for i, flags in enumerate(TINY_RUNS)]
    + [TRANSFORMER_MOE.split(), [*TRANSFORMER_MOE.split(), "--train_steps=5", "--verbosity=0"],
       [*TRANSFORMER_MOE.split(), *INT8_EXPORT.split()]]
    + [run_line(*RUNS[name]) for name in RUNS], prepare=write_run_inputs)


def finished(tiny_runs, name):
    """RUNS' run `name`: its end and its model_dir."""
    model_dir, flags = RUNS[name]
    end, tmp = tiny_runs[" ".join(run_line(model_dir, flags))]
    return end, tmp / model_dir


def finished_ok(tiny_runs, name):
    end, model_dir = finished(tiny_runs, name)
    assert end["status"] == 0, end["stderr"][-3000:]
    return model_dir


def refused_resumption(tiny_runs, name):
    """The stderr of RUNS' run `name`, which must have ended before training."""
    end, _ = finished(tiny_runs, name)
    assert end["status"] not in (0, "exception"), end["stderr"][-3000:]
    return end["stderr"]


def test_text_source_skips_and_counts_corrupt_lines(tiny_runs):
    skipped = metrics(finished_ok(tiny_runs, "corrupt lines"))["skipped_lines"]
    # Held-out lines are chosen by a hash of the line: count where each bad line went.
    assert sum(skipped.values()) == len(CORRUPT_LINES)


def test_text_source_with_explicit_held_out_files(tiny_runs):
    check_metrics(metrics(finished_ok(tiny_runs, "held-out files")), 4)


@pytest.mark.parametrize("flags", list(TINY_RUNS))
def test_every_model_and_router_trains_through_the_binary(flags, tiny_runs):
    index = list(TINY_RUNS).index(flags)
    (end, tmp) = tiny_runs[" ".join(run_line(index, flags))]
    assert end["status"] == 0, end["stderr"][-3000:]
    model_dir = tmp / str(index)
    values = metrics(model_dir)
    check_metrics(values, 3)
    assert values["skipped_lines"] == {"train": 0, "valid": 0, "test": 0}
    assert os.path.exists(model_dir / "subword.model")
    if "transformer-moe" in flags:
        per_token = values["balance"]["block_2_moe/experts_per_token"]
        assert 0 < per_token <= TINY_RUNS[flags]
        if "switch" in flags:
            assert per_token == 1.0


def test_transformer_resumes_and_exports_the_trained_model(tiny_runs, tmp_path):
    (first, tmp), (resumed, _) = (tiny_runs[TRANSFORMER_MOE],
                                  tiny_runs[f"{TRANSFORMER_MOE} --train_steps=5 --verbosity=0"])
    assert first["status"] == resumed["status"] == 0, resumed["stderr"][-3000:]
    assert "at step 3." in resumed["stderr"]
    check_metrics(metrics(tmp / "transformer_moe"), 5)
    assert_export_serves_the_checkpoint(tmp / "transformer_moe", tmp_path)

    # int8 experts: a smaller export scoring the test split within 1% of float32's.
    (int8, _) = tiny_runs[f"{TRANSFORMER_MOE} {INT8_EXPORT}"]
    assert int8["status"] == 0, int8["stderr"][-3000:]
    from benchmarks.serving_bench import directory_mib, test_perplexity
    exports = {name: str(tmp / "transformer_moe" / name) for name in ("export", "int8")}
    assert directory_mib(exports["int8"]) < directory_mib(exports["export"])
    perplexity = {name: test_perplexity(tf.saved_model.load(path).signatures[
        "serving_default"]) for name, path in exports.items()}
    assert 1 < perplexity["export"] < 600
    assert abs(perplexity["int8"] / perplexity["export"] - 1) < 0.01


def test_incompatible_model_dir_is_refused_untouched(tmp_path):
    run_ok(lm_command(tmp_path, "--train_steps=2", "--export_dir="))
    before = {name: os.path.getmtime(tmp_path / name) for name in os.listdir(tmp_path)}
    result = run(lm_command(tmp_path, "--train_steps=2", "--export_dir=",
                            "--hidden_size=48"))
    assert result.returncode != 0
    assert "hidden_size" in result.stderr and "another configuration" in result.stderr
    after = {name: os.path.getmtime(tmp_path / name) for name in os.listdir(tmp_path)}
    assert before == after


# One of each way a set-up is refused (absl validators and enums, MoEConfig, the data
# spec and files, the output directories, the placement), all before training. {tmp} is
# the fixture's directory; each command line has a --model_dir of its own in it.
REFUSED_SETUPS = [
    ("--k=0", "--k must be a positive integer; got 0"),
    ("--num_experts=4 --k=5", "--k (5) must be <= num_experts (4)"),
    ("--num_experts=6 --num_groups=4", "divisible by"),
    ("--dropout=1.5", "--dropout must be in [0, 1)"),
    ("--learning_rate=-1", "--learning_rate must be > 0"),
    ("--model=gpt", "--model"),
    ("--optimizer=sgd", "--optimizer"),
    ("--nan_policy=ignore", "--nan_policy"),
    ("--data=hub:lm1b", "Error: --data='hub:lm1b'"),
    ("--data=builtin:fr", "Error: --data=builtin:fr"),
    ("--data=text:/nonexistent/file.txt",
     "Error: data file not found: /nonexistent/file.txt"),
    ("--data=text:{tmp}/empty.txt",
     "Error: --data=text:{tmp}/empty.txt: no valid training line"),
    # 2 MB of random bytes: a few dozen short lines are valid UTF-8.
    ("--data=text:{tmp}/random.bin", "valid training lines give"),
    ("--data=text:{tmp}", "Error: data file is a directory: {tmp}"),
    ("--valid_data={tmp}/a_file --test_data={tmp}/a_file",
     "Error: --valid_data applies to --data=text:PATH only; --data=builtin:en has "
     "held-out splits of its own."),
    ("--vocab_size=3", "--vocab_size=3: a vocabulary of 3 subwords is too small for "
                       "these lines: they need at least 5"),
    ("--vocab_size=20", "--vocab_size=20: a vocabulary of 20 subwords is too small for "
                        "these lines: they need at least"),
    ("--model_dir=", "--model_dir must name the run's directory."),
    ("--model_dir={tmp}/a_file/run",
     "Error: --model_dir={tmp}/a_file/run cannot be created: {tmp}/a_file is a file."),
    ("--model_dir=/proc/sys/moe_tf_run",
     "Error: --model_dir=/proc/sys/moe_tf_run cannot be written: /proc/sys is not "
     "writable by this user."),
    ("--export_dir=/proc/sys/moe_tf_export",
     "Error: --export_dir=/proc/sys/moe_tf_export cannot be written"),
    ("--capacity_group_size=64",
     "--capacity_group_size only applies to dispatch='capacity'"),
    ("--dispatch=capacity --capacity_group_size=0",
     "--capacity_group_size must be a positive integer"),
    ("--gating=balanced --noisy_gating",
     "--noisy_gating does not apply to gating='balanced' (it applies to gating='top_k')"),
    ("--jit_compile", "layer 'moe' cannot be compiled with XLA (dispatch='sparse' has "
                      "dynamic shapes; --dispatch=capacity compiles)"),
    ("--jit_compile --dispatch=capacity --strategy=mirrored",
     "--jit_compile needs --strategy=default"),
]
refused_setups = refused_setups_fixture("train.lm", ["--preset=tiny"], REFUSED_SETUPS)


@pytest.mark.parametrize("flag,message", REFUSED_SETUPS)
def test_refused_setups_name_the_flag_or_file(flag, message, refused_setups):
    check_refused(refused_setups, flag, message)


def test_trained_export_serves_in_fresh_process_and_through_the_binaries(tmp_path, capsys):
    """One tiny trained run, as a user runs it (without the tests' TF_CPP_MIN_LOG_LEVEL),
    and its export: served in a fresh process, by train.score and by serving_bench."""
    model_dir = tmp_path / "run"
    env = {key: value for key, value in os.environ.items()
           if key != "TF_CPP_MIN_LOG_LEVEL"}
    trained = run_ok(lm_command(model_dir, "--train_steps=8"), env=env)
    assert_only_project_lines(trained.stderr)
    assert_export_serves_the_checkpoint(model_dir, tmp_path)
    assert_score_binary_serves_the_export(model_dir / "export")
    assert_serving_bench_reads_the_export(model_dir / "export", tmp_path, capsys)


def assert_only_project_lines(stderr):
    """Every line is an absl log line of one of the project's modules (train.cli keeps
    TensorFlow's and Keras's INFO lines and C++ start-up lines out)."""
    modules = {os.path.basename(path) for package in ("train", "models", "moe_tf")
               for path in glob.glob(os.path.join(ROOT, package, "**", "*.py"),
                                     recursive=True)}
    lines = stderr.strip().splitlines()
    assert lines
    for line in lines:
        logged = re.match(r"[IWE]\d{4} [\d:.]+ +\d+ (\S+\.py):\d+\] ", line)
        assert logged and logged.group(1) in modules, line


def assert_export_serves_the_checkpoint(model_dir, tmp_path):
    """model_dir/export, served in a fresh process, scores sentences as the model of the
    run's last checkpoint does in this process (through the training loss); and answers
    an empty batch, a sentence that is not UTF-8 and a 20,000-word one as documented."""
    sentences = [b"In the beginning God created the heavens and the earth.",
                 b"And God said, Let there be light.",
                 b"zzzz qqqq unknownword",
                 b"the " * 20_000,  # longer than max_length: cut, scored without eos
                 b"caf\xe9 \xff\xfe not UTF-8"]
    np.save(tmp_path / "text.npy", np.array(sentences, dtype=object))
    np.save(tmp_path / "empty.npy", np.array([], dtype=object))
    serve_in_fresh_process(
        [(model_dir / "export", tmp_path / "text.npy", tmp_path / "out.npy"),
         (model_dir / "export", tmp_path / "empty.npy", tmp_path / "empty_out.npy")],
        tmp_path)
    log_prob, num_tokens, truncated, valid_utf8 = np.load(tmp_path / "out.npy")
    assert np.load(tmp_path / "empty_out.npy").shape == (4, 0)

    # The same sentences through the training loss, in this process, from the checkpoint,
    # as one batch as the server scores them (a capacity-dispatch layer's drops depend on
    # the batch).
    from train.data.text import sentence_sequences
    from train.serving.trained_model import restore_trained_model
    from train.training.losses import masked_nll_sums
    from models.lm import LanguageModelConfig, build_language_model

    model, tokenizer, run_config, _ = restore_trained_model(
        str(model_dir), LanguageModelConfig, build_language_model)
    batch = sentence_sequences(tokenizer.tokenize(tf.constant(sentences)),
                               max_length=run_config["max_length"]).to_tensor()
    logits = model(batch[:, :-1], training=False)
    for i in range(4):
        _, nll_sum, tokens = masked_nll_sums(logits[i], batch[i, 1:])
        assert num_tokens[i] == int(tokens)
        np.testing.assert_allclose(log_prob[i], -float(nll_sum), rtol=1e-5)
    assert num_tokens[3] == run_config["max_length"]
    # Cut where the pieces and the end-of-sentence do not fit (training's cut).
    pieces = tokenizer.tokenize(tf.constant(sentences)).row_lengths().numpy()
    assert truncated.tolist() == (pieces + 1 > run_config["max_length"]).tolist()
    assert truncated[3] and (run_config["max_length"] < 20 or not truncated[0])
    assert valid_utf8.tolist() == [1, 1, 1, 1, 0]
    assert np.isnan(log_prob[4]) and num_tokens[4] == 0


def assert_score_binary_serves_the_export(export):
    """train.score scores lines (naming invalid UTF-8 and cut ones) and samples from a
    prompt; train.translate refuses a language model in one line."""
    scored = subprocess.run(
        [sys.executable, "-m", "train.score", f"--saved_model={export}"],
        input=b"In the beginning\n\nAnd God said\n\xff\xfe\n" + b"the " * 50 + b"\n",
        cwd=ROOT, capture_output=True, timeout=300)
    assert scored.returncode == 0, scored.stderr[-2000:]
    rows = [line.split("\t") for line in scored.stdout.decode().strip().splitlines()]
    assert [row[2] for row in rows[:2]] == ["In the beginning", "And God said"]
    assert all(float(row[0]) > 1.0 and int(row[1]) > 0 and len(row) == 3
               for row in rows[:2])
    assert rows[2][0] == "nan" and rows[2][3] == "invalid UTF-8"
    assert rows[3][3] == "truncated"
    sampled = subprocess.run(
        [sys.executable, "-m", "train.score", f"--saved_model={export}",
         "--prompt=And God", "--max_new_tokens=5"], cwd=ROOT, capture_output=True,
        text=True, timeout=300)
    assert sampled.returncode == 0, sampled.stderr[-2000:]
    assert sampled.stdout.startswith("And God")
    nothing = subprocess.run(  # no token to draw: the prompt, nothing after it
        [sys.executable, "-m", "train.score", f"--saved_model={export}",
         "--prompt=And God", "--max_new_tokens=0"], cwd=ROOT, capture_output=True,
        text=True, timeout=300)
    assert nothing.returncode == 0, nothing.stderr[-2000:]
    assert nothing.stdout.strip() == "And God"
    translated = subprocess.run(  # a language model given to the translation binary
        [sys.executable, "-m", "train.translate", f"--saved_model={export}"],
        input="In the beginning\n", cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert translated.returncode == 2 and "Traceback" not in translated.stderr
    assert translated.stderr.strip().endswith("not a translation model of train.nmt (no "
                                              "translation output); train.score serves "
                                              "language models.")


def assert_serving_bench_reads_the_export(export, tmp_path, capsys):
    """The benchmark measures in a fresh process of its own; its driver runs here."""
    from benchmarks import serving_bench
    serving_bench.main([f"--model=tiny={export}", "--batch_sizes=1,8",
                        "--sentences=16", "--generate_batch_sizes=2", "--generate_calls=2",
                        "--new_tokens=4", f"--json={tmp_path / 'serving.json'}"])
    results = json.loads((tmp_path / "serving.json").read_text())["tiny"]
    assert set(results["scoring"]) == {"1", "8"} and set(results["generate"]) == {"2"}
    for numbers in [*results["scoring"].values(), *results["generate"].values()]:
        assert numbers["per_second"] > 0 and 0 < numbers["p50_ms"] <= numbers["p99_ms"]
    assert 1 < results["test_perplexity"] < 600 and results["size_mib"] > 0
    assert results["allocator"] == "pooled"  # as the serving process saw it
    assert "| tiny | sentences scored | 8 |" in capsys.readouterr().out
    unpooled = serving_bench.child_environment("unpooled")
    assert unpooled["TF_CPU_ALLOCATOR_USE_BFC"] == "false"
    assert unpooled["TF_ONEDNN_USE_SYSTEM_ALLOCATOR"] == "1"


def test_score_binary_refuses_flags_out_of_range():
    cases = [("--batch_size=0", "--batch_size must be >= 1"),
             ("--max_new_tokens=-3", "--max_new_tokens must be >= 0"),
             ("--temperature=-1", "--temperature must be >= 0"),
             # In range: the flags pass, and the directory is what is refused.
             ("--batch_size=1 --max_new_tokens=0 --temperature=0",
              "Error: --saved_model=/nonexistent: no SavedModel there.")]
    ends = run_command_lines("train.score", [["--saved_model=/nonexistent", *flag.split()]
                                             for flag, _ in cases])
    for (flag, message), end in zip(cases, ends):
        assert end["status"] in (1, 2) and message in end["stderr"], (flag, end)
        assert "Traceback" not in end["stderr"]


def test_restore_trained_model_names_what_is_missing(tmp_path):
    from train.serving.trained_model import restore_trained_model
    from models.lm import LanguageModelConfig, build_language_model

    with pytest.raises(FileNotFoundError, match="run_config.json not found"):
        restore_trained_model(str(tmp_path), LanguageModelConfig, build_language_model)
    (tmp_path / "run_config.json").write_text(json.dumps({"model": {}}))
    with pytest.raises(FileNotFoundError, match="no checkpoint in checkpoints/"):
        restore_trained_model(str(tmp_path), LanguageModelConfig, build_language_model)


def test_run_config_check_names_the_setting_and_accepts_later_settings(tmp_path):
    """A resumed run must have the recorded settings; one the record predates (default
    None) counts as None, so runs from before a new setting still resume."""
    from train.training.run_config import check_run_config

    model_dir = str(tmp_path)
    check_run_config(model_dir, {"model": {"k": 2}, "data": "builtin:en"})
    check_run_config(model_dir, {"model": {"k": 2, "capacity_group_size": None},
                                 "data": "builtin:en"})
    with pytest.raises(ValueError, match=r"--model\.k: was 2, now 4"):
        check_run_config(model_dir, {"model": {"k": 4}, "data": "builtin:en"})
    with pytest.raises(ValueError, match=r"--model\.capacity_group_size: was None, now 64"):
        check_run_config(model_dir, {"model": {"k": 2, "capacity_group_size": 64},
                                     "data": "builtin:en"})
    with pytest.raises(ValueError, match=r"--data: was 'builtin:en', now 'builtin:es'"):
        check_run_config(model_dir, {"model": {"k": 2}, "data": "builtin:es"})
    # Nested settings are compared one by one, named by their path.
    nested = str(tmp_path / "nested")
    check_run_config(nested, {"model": {"moe": {"k": 2, "gating": "top_k"}}})
    with pytest.raises(ValueError, match=r"another configuration \(--model\.moe\.k: "
                                         r"was 2, now 4\)"):
        check_run_config(nested, {"model": {"moe": {"k": 4, "gating": "top_k"}}})


def moe_flags(*argv):
    """Fresh MoE flags (as train.lm defines them), parsed from `argv`."""
    from absl import flags
    from train.training import flags as training_flags

    flag_values = flags.FlagValues()
    training_flags.define_moe_flags(flag_values)
    flag_values(["train.lm", *argv])
    return flag_values


def test_moe_flags_build_one_moe_config_with_its_defaults():
    import dataclasses
    from moe_tf import MoEConfig
    from train.training.flags import moe_config_from_flags

    defaults = moe_flags()
    for field in dataclasses.fields(MoEConfig):
        default = defaults[field.name].default
        assert default == (field.default if field.name != "compiled_kernels" else "auto")
    assert moe_config_from_flags(defaults) == MoEConfig()
    # Gate-specific flags are unset unless given: the chosen gate's defaults fill them.
    balanced = moe_config_from_flags(moe_flags("--gating=balanced"))
    assert balanced == MoEConfig(gating="balanced") and balanced.noisy_gating is None
    assert moe_config_from_flags(moe_flags("--num_groups=0")) == MoEConfig()
    assert moe_config_from_flags(moe_flags(
        "--num_experts=16", "--num_groups=4", "--k=2", "--group_k=3", "--nonoisy_gating",
        "--noise_epsilon=0.5", "--importance_weight=0", "--load_weight=0.2",
        "--dispatch=capacity", "--capacity_factor=1.5", "--capacity_group_size=64",
        "--recompute_activations", "--compiled_kernels=false")) == MoEConfig(
        num_experts=16, num_groups=4, k=2, group_k=3, noisy_gating=False,
        noise_epsilon=0.5, importance_weight=0.0, load_weight=0.2, dispatch="capacity",
        capacity_factor=1.5, capacity_group_size=64, recompute_activations=True,
        compiled_kernels=False)
    # The binary's own settings win (train.nmt's gating by language pairs).
    assert moe_config_from_flags(defaults, gating="balanced", load_weight=0.01) == \
        MoEConfig(gating="balanced", load_weight=0.01)
    # MoEConfig's refusals, named by flag.
    for argv, message in ((["--gating=balanced", "--noisy_gating"],
                           "--noisy_gating does not apply to gating='balanced'"),
                          (["--threshold_loss_weight=2"],
                           "--threshold_loss_weight does not apply to gating='top_k'"),
                          (["--capacity_factor=2"],
                           "--capacity_factor only applies to dispatch='capacity'"),
                          (["--num_experts=4", "--k=5"],
                           r"--k \(5\) must be <= num_experts \(4\)")):
        with pytest.raises(ValueError, match="^" + message):
            moe_config_from_flags(moe_flags(*argv))


# What train.lm --preset=tiny recorded before the MoE settings were one MoEConfig (and
# before --optimizer).
LEGACY_RUN_CONFIG = {
    "model": {"architecture": "moe", "vocab_size": 512, "model_dim": 32, "num_experts": 4,
              "k": 2, "num_groups": None, "hidden_size": 32, "noisy_gating": True,
              "importance_weight": 0.1, "load_weight": 0.1, "dropout": 0.1,
              "dispatch": "sparse", "capacity_factor": None, "capacity_group_size": None},
    "data": "builtin:en", "valid_data": None, "test_data": None, "max_length": 24,
    "seed": 0}


def test_upgrade_run_config_reads_a_legacy_record_in_todays_layout():
    import dataclasses
    from models.lm import LanguageModelConfig
    from moe_tf import MoEConfig
    from train.training.run_config import upgrade_run_config

    upgraded = upgrade_run_config(LanguageModelConfig, LEGACY_RUN_CONFIG)
    config = LanguageModelConfig(vocab_size=512, model_dim=32,
                                 moe=MoEConfig(num_experts=4, k=2, hidden_size=32))
    assert upgraded == dict(LEGACY_RUN_CONFIG, model=dataclasses.asdict(config),
                            optimizer="adam")
    assert upgrade_run_config(LanguageModelConfig, upgraded) == upgraded
    # A record of another model stays as it is: the comparison lists the differences.
    other = dict(LEGACY_RUN_CONFIG, model={"attention_dim": 8}, optimizer="factored_adam")
    assert upgrade_run_config(LanguageModelConfig, other) == other


def test_run_recorded_before_moe_config_resumes_and_restores(tiny_runs):
    from train.serving.trained_model import restore_trained_model
    from models.lm import LanguageModelConfig, build_language_model

    model_dir = finished_ok(tiny_runs, "legacy")
    check_metrics(metrics(model_dir), 2)
    # The record is kept as it was written, and still restores the model.
    assert json.loads((model_dir / "run_config.json").read_text()) == LEGACY_RUN_CONFIG
    model = restore_trained_model(str(model_dir), LanguageModelConfig,
                                  build_language_model).model
    assert model.get_layer("moe").k == 2
    assert "--model.moe.k: was 2, now 1" in refused_resumption(
        tiny_runs, "legacy, resumed with k = 1")


def test_factored_adam_trains_and_the_optimizer_is_part_of_the_run(tiny_runs):
    model_dir = finished_ok(tiny_runs, "factored adam")
    check_metrics(metrics(model_dir), 4)
    recorded = json.loads((model_dir / "run_config.json").read_text())
    assert recorded["optimizer"] == "factored_adam"
    assert recorded["model"]["moe"]["gating"] == "balanced"
    assert recorded["model"]["moe"]["noisy_gating"] is None
    assert recorded["model"]["moe"]["threshold_loss_weight"] == 1.0
    assert "num_experts" not in recorded["model"]
    assert "--optimizer: was 'factored_adam', now 'adam'" in refused_resumption(
        tiny_runs, "factored adam, resumed with adam")


def test_capacity_dispatch_trains_under_xla_as_without_it(tiny_runs):
    """--jit_compile compiles the steps with XLA: the same losses and dropped assignments
    as uncompiled. Without dropout and gating noise: XLA draws other random numbers."""
    compiled, uncompiled = (metrics(finished_ok(tiny_runs, name))
                            for name in ("capacity under XLA", "capacity"))
    check_metrics(compiled, 6)
    check_metrics(uncompiled, 6)
    assert compiled["balance"]["moe/dropped_fraction"] > 0
    assert compiled["balance"]["moe/dropped_fraction"] == pytest.approx(
        uncompiled["balance"]["moe/dropped_fraction"], abs=1e-6)
    np.testing.assert_allclose(compiled["final_train_loss"],
                               uncompiled["final_train_loss"], rtol=1e-5)
    np.testing.assert_allclose(compiled["test_perplexity"],
                               uncompiled["test_perplexity"], rtol=1e-5)
