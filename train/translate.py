"""Translates the lines of stdin with a SavedModel exported by train.nmt.

    echo "In the beginning God created the heavens and the earth." | \
        python -m train.translate --saved_model DIR
    python -m train.translate --saved_model DIR --target_language=en < spanish.txt

Prints one translation per input line (an empty line for an empty one). A multilingual
model needs --target_language. Needs only TensorFlow and tensorflow-text.
"""

from train.cli import exit_with_error, quiet_tensorflow

quiet_tensorflow()  # before this binary first imports TensorFlow

import re
import sys

import tensorflow as tf
import tensorflow_text  # noqa: F401  (registers the tokenizer ops the SavedModel uses)
from absl import app, flags

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """This binary's flags, in `flag_values`; `run` defines them in absl's FLAGS
    (importing this module defines nothing)."""
    where = dict(flag_values=flag_values)
    flags.DEFINE_string("saved_model", None, "Directory of a SavedModel from train.nmt.",
                        **where)
    flags.DEFINE_string("target_language", None,
                        "Language to translate into (multilingual models only), e.g. es.",
                        **where)
    flags.DEFINE_integer("batch_size", 32, "Lines translated at once.", **where)
    flags.register_validator("batch_size", lambda v: v is not None and v >= 1,
                             message="--batch_size must be >= 1.", **where)
    flags.mark_flag_as_required("saved_model", **where)


def translate_lines(translate, lines, target_language):
    """Yields the translation of each line; empty lines stay empty."""
    for start in range(0, len(lines), FLAGS.batch_size):
        batch = lines[start:start + FLAGS.batch_size]
        texts = [line for line in batch if line.strip()]
        inputs = {"text": tf.constant(texts, tf.string)}
        if target_language is not None:
            inputs["target_language"] = tf.fill([len(texts)], target_language)
        translated = iter(translate(**inputs)["translation"].numpy() if texts else [])
        for line in batch:
            yield next(translated).decode("utf-8") if line.strip() else ""


def main(argv):
    del argv
    if not tf.saved_model.contains_saved_model(FLAGS.saved_model):
        exit_with_error(f"--saved_model={FLAGS.saved_model}: no SavedModel there.")
    translate = tf.saved_model.load(FLAGS.saved_model).signatures.get("serving_default")
    if translate is None or "translation" not in translate.structured_outputs:
        exit_with_error(f"--saved_model={FLAGS.saved_model}: not a translation model of "
                        f"train.nmt (no translation output); train.score serves language "
                        f"models.")
    multilingual = "target_language" in translate.structured_input_signature[1]
    if multilingual and not FLAGS.target_language:
        exit_with_error("--target_language is required: this model is multilingual.")
    if not multilingual and FLAGS.target_language:
        exit_with_error("--target_language: this model translates one language pair "
                        "only.")
    lines = [line.rstrip("\n") for line in sys.stdin]
    try:
        for translation in translate_lines(translate, lines, FLAGS.target_language):
            print(translation)
    except tf.errors.InvalidArgumentError as error:
        # The model's own message names the languages it knows.
        known = re.search(r"target_language must be one of [^\]]*", error.message)
        if known is None:
            raise
        exit_with_error(f"--target_language={FLAGS.target_language}: "
                        f"{known.group(0)}.")


def run(argv=None):
    """Entry point of `python -m train.translate` and of the console script
    `moe-translate`: defines the flags, then parses `argv` (default: sys.argv) and runs
    `main`."""
    define_flags()
    app.run(main, argv=argv)


if __name__ == "__main__":
    run()
