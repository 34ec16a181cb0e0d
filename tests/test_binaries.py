"""The training and serving binaries' flags: defined by their entry points, not on import,
so that their modules share a process; and the packages leave the environment alone."""

import os
import subprocess
import sys

import pytest
from absl import flags

from models.translation_config import TRANSLATION_MOE
from train import lm, nmt, score, translate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parsed(binary, *argv):
    """`binary`'s flags, defined in a FlagValues of their own and parsed from `argv`."""
    flag_values = flags.FlagValues()
    binary.define_flags(flag_values)
    flag_values([binary.__name__, *argv])
    return flag_values


def test_binaries_share_a_process_and_parse_their_own_flags():
    # Importing the four modules (above) defined none of their flags.
    assert not {"model_dim", "saved_model", "batch_size"} & set(flags.FLAGS)

    lm_flags = parsed(lm, "--preset=tiny", "--model=4xlstm", "--k=2")
    assert (lm_flags.model, lm_flags.k, lm_flags.preset) == ("4xlstm", 2, "tiny")
    assert (lm_flags.data, lm_flags.train_steps, lm_flags.gating) == ("builtin:en", 900,
                                                                      "top_k")
    nmt_flags = parsed(nmt, "--model=dense", "--beam_width=2")
    assert (nmt_flags.model, nmt_flags.beam_width) == ("dense", 2)
    # The translation binary's own defaults.
    assert (nmt_flags.data, nmt_flags.train_steps, nmt_flags.warmup_steps) == (
        "builtin:en-es", 600, 60)
    assert nmt_flags.gating is None
    assert nmt_flags.load_weight == TRANSLATION_MOE.load_weight
    assert parsed(score, "--saved_model=/m", "--seed=3").seed == 3
    assert parsed(translate, "--saved_model=/m", "--batch_size=2").batch_size == 2


@pytest.mark.parametrize("binary,argv,message", [
    (lm, ["--model_dim=0"], "--model_dim must be >= 1"),
    (lm, ["--clip_norm=-1"], "--clip_norm must be >= 0"),
    (lm, ["--strategy=dtensor", "--mesh=batch:2"], "--strategy=dtensor needs --mesh"),
    (nmt, ["--model_dim=7"], "--model_dim must be even"),
    (nmt, ["--num_groups=2"], "MoE layers are flat"),
    (nmt, ["--beam_width=0"], "--beam_width must be >= 1"),
    (score, [], "--saved_model must have a value"),
    (translate, ["--saved_model=/m", "--batch_size=0"], "--batch_size must be >= 1"),
])
def test_binaries_check_their_flags(binary, argv, message):
    with pytest.raises(flags.IllegalFlagValueError, match=message):
        parsed(binary, *argv)


def test_importing_the_packages_sets_no_environment_variable():
    env = {key: value for key, value in os.environ.items()
           if key != "TF_CPP_MIN_LOG_LEVEL"}
    check = subprocess.run(
        [sys.executable, "-c", "import os, train, train.data, train.serving, "
         "train.training; print('TF_CPP_MIN_LOG_LEVEL' in os.environ)"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert check.returncode == 0, check.stderr[-2000:]
    assert check.stdout.strip() == "False"


@pytest.mark.slow
@pytest.mark.parametrize("command", [
    ["-m", "train.lm", "--help"],
    # As the console scripts call it: `run()`, the flags in sys.argv.
    ["-c", "from train.nmt import run; run()", "--helpfull"],
])
def test_help_lists_the_flags(command):
    shown = subprocess.run([sys.executable, *command], cwd=ROOT, capture_output=True,
                           text=True, timeout=300)
    # absl's help flags exit with status 1.
    assert "--model_dim" in shown.stdout, shown.stderr[-2000:]


@pytest.mark.parametrize("argv,asks", [
    ([], False), (["--verbosity=0"], False), (["--verbosity=1"], True),
    (["--verbosity", "2"], True), (["-v", "1"], True), (["-v1"], True),
    (["-v=-1"], False), (["--model_dir=/v1"], False),
])
def test_absl_verbosity_brings_tensorflow_logs_back(argv, asks):
    from train.cli import asks_for_debug_logs

    assert asks_for_debug_logs(["train.lm", *argv]) is asks
