"""Scores sentences with, or samples from, an exported language model.

    echo "In the beginning God created" | python -m train.score --saved_model DIR
    python -m train.score --saved_model DIR --prompt "And God said"

Prints one line per input line: perplexity, tokens, text (tab-separated). Needs only
TensorFlow and tensorflow-text.
"""

from train.cli import exit_with_error, quiet_tensorflow

quiet_tensorflow()  # before this binary first imports TensorFlow

import sys

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
    flags.DEFINE_float("temperature", 1.0, "Sampling temperature.", **where)
    flags.DEFINE_integer("seed", 0, "Sampling seed.", **where)
    flags.DEFINE_integer("batch_size", 64, "Lines scored at once.", **where)
    flags.mark_flag_as_required("saved_model", **where)


def score_lines(scorer, lines):
    """Yields (perplexity, num_tokens, line) for each line."""
    for start in range(0, len(lines), FLAGS.batch_size):
        batch = lines[start:start + FLAGS.batch_size]
        result = scorer(text=tf.constant(batch))
        for line, log_prob, tokens in zip(batch, result["log_prob"].numpy(),
                                          result["num_tokens"].numpy()):
            yield float(tf.exp(-log_prob / max(int(tokens), 1))), int(tokens), line


def main(argv):
    del argv
    if not tf.saved_model.contains_saved_model(FLAGS.saved_model):
        exit_with_error(f"--saved_model={FLAGS.saved_model}: no SavedModel there.")
    loaded = tf.saved_model.load(FLAGS.saved_model)
    if FLAGS.prompt is not None:
        result = loaded.signatures["generate"](
            prompt=tf.constant(FLAGS.prompt),
            max_new_tokens=tf.constant(FLAGS.max_new_tokens),
            temperature=tf.constant(FLAGS.temperature), seed=tf.constant(FLAGS.seed))
        print(FLAGS.prompt, result["text"].numpy().decode("utf-8"))
        return
    lines = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    for perplexity, tokens, line in score_lines(loaded.signatures["serving_default"],
                                                lines):
        print(f"{perplexity:.2f}\t{tokens}\t{line}")


def run(argv=None):
    """Entry point of `python -m train.score` and of the console script `moe-score-lm`:
    defines the flags, then parses `argv` (default: sys.argv) and runs `main`."""
    define_flags()
    app.run(main, argv=argv)


if __name__ == "__main__":
    run()
