"""Scores sentences with, or samples from, an exported language model.

    echo "In the beginning God created" | python -m train.score --saved_model DIR
    python -m train.score --saved_model DIR --prompt "And God said"

Prints one line per non-empty input line: perplexity, tokens, text, tab-separated, and a
fourth column "truncated" (longer than the model's max_length: scored on its start) or
"invalid UTF-8" (not scored; perplexity nan) where that applies. Needs only TensorFlow
and tensorflow-text.
"""

from train.cli import exit_with_error, quiet_tensorflow

quiet_tensorflow()  # before this binary first imports TensorFlow

import sys

import numpy as np
import tensorflow as tf
import tensorflow_text  # noqa: F401  (registers the tokenizer ops the SavedModel uses)
from absl import app, flags

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """This binary's flags, in `flag_values`; `run` defines them in absl's FLAGS
    (importing this module defines nothing)."""
    where = dict(flag_values=flag_values)
    flags.DEFINE_string("saved_model", None, "Directory of a SavedModel from train.lm.",
                        **where)
    flags.DEFINE_string("prompt", None, "Sample a continuation of this text instead.",
                        **where)
    flags.DEFINE_integer("max_new_tokens", 40, "Tokens to sample after --prompt.", **where)
    flags.DEFINE_float("temperature", 1.0, "Sampling temperature; 0 samples greedily.",
                       **where)
    flags.DEFINE_integer("seed", 0, "Sampling seed.", **where)
    flags.DEFINE_integer("batch_size", 64, "Lines scored at once.", **where)
    flags.register_validator("batch_size", lambda v: v is not None and v >= 1,
                             message="--batch_size must be >= 1.", **where)
    flags.register_validator("max_new_tokens", lambda v: v is not None and v >= 0,
                             message="--max_new_tokens must be >= 0.", **where)
    flags.register_validator("temperature", lambda v: v is not None and v >= 0,
                             message="--temperature must be >= 0 (0: greedy).", **where)
    flags.mark_flag_as_required("saved_model", **where)


def score_lines(scorer, lines):
    """Yields (perplexity, num_tokens, note, line) for each line (bytes): the note says
    "truncated" (scored on its first max_length tokens) or "invalid UTF-8" (not scored:
    perplexity nan), else is empty."""
    for start in range(0, len(lines), FLAGS.batch_size):
        batch = lines[start:start + FLAGS.batch_size]
        result = {name: value.numpy() for name, value in
                  scorer(text=tf.constant(batch, tf.string)).items()}
        for i, line in enumerate(batch):
            tokens = int(result["num_tokens"][i])
            note = ("invalid UTF-8" if not result["valid_utf8"][i] else
                    "truncated" if result["truncated"][i] else "")
            perplexity = float(np.exp(-result["log_prob"][i] / max(tokens, 1)))
            yield perplexity, tokens, note, line


def main(argv):
    del argv
    if not tf.saved_model.contains_saved_model(FLAGS.saved_model):
        exit_with_error(f"--saved_model={FLAGS.saved_model}: no SavedModel there.")
    loaded = tf.saved_model.load(FLAGS.saved_model)
    if "generate" not in loaded.signatures:
        exit_with_error(f"--saved_model={FLAGS.saved_model}: not a language model of "
                        f"train.lm (no generate signature); train.translate serves "
                        f"translation models.")
    if FLAGS.prompt is not None:
        result = loaded.signatures["generate"](
            prompt=tf.constant([FLAGS.prompt]),
            max_new_tokens=tf.constant(FLAGS.max_new_tokens),
            temperature=tf.constant(FLAGS.temperature), seed=tf.constant(FLAGS.seed))
        print(FLAGS.prompt, result["text"].numpy()[0].decode("utf-8"))
        return
    # Bytes: a line that is not UTF-8 is reported, not a crash of the reader.
    lines = [line.rstrip(b"\r\n") for line in sys.stdin.buffer if line.strip()]
    for perplexity, tokens, note, line in score_lines(
            loaded.signatures["serving_default"], lines):
        print(f"{perplexity:.2f}\t{tokens}\t{line.decode('utf-8', 'replace')}"
              + (f"\t{note}" if note else ""))


def run(argv=None):
    """Entry point of `python -m train.score` and of the console script `moe-score-lm`:
    defines the flags, then parses `argv` (default: sys.argv) and runs `main`."""
    define_flags()
    app.run(main, argv=argv)


if __name__ == "__main__":
    run()
