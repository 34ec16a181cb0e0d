"""Runs a SavedModel's `serving_default` signature in a process without this project.

Usage: python saved_model_runner.py SAVED_MODEL_DIR INPUT.npy OUTPUT.npy [SAVED_MODEL_DIR
INPUT.npy OUTPUT.npy ...]
Each input array (numbers, or an object array of str or bytes) is passed as its SavedModel
signature's one input; the outputs are saved stacked in the order of their sorted names.
Many SavedModels are served by one process: TensorFlow starts once. Only TensorFlow and
tensorflow_text (whose ops the language models' tokenizers use) are imported.
Imported, it gives the tests `serve_in_fresh_process`.
"""

import importlib.abc
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
PROJECT_PACKAGES = ("moe_tf", "models", "train")


class _BlockProjectPackages(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in PROJECT_PACKAGES:
            raise ImportError(f"{name} must not be needed to serve the SavedModel")
        return None


def serve_in_fresh_process(requests, directory):
    """Runs this script in a child process (in `directory`, without PYTHONPATH) on
    `requests`, (SAVED_MODEL_DIR, INPUT.npy, OUTPUT.npy) triples; it must succeed."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    served = subprocess.run([sys.executable, os.path.abspath(__file__),
                             *[str(path) for request in requests for path in request]],
                            cwd=directory, env=env, capture_output=True, text=True,
                            timeout=300)
    assert served.returncode == 0, served.stderr[-3000:]


def main(*paths):
    sys.meta_path.insert(0, _BlockProjectPackages())
    import numpy as np
    import tensorflow as tf
    import tensorflow_text  # noqa: F401  (tokenizer ops)

    if not paths or len(paths) % 3:
        raise SystemExit(f"expected SAVED_MODEL_DIR INPUT OUTPUT triples; got {paths}")
    signatures = {}
    for saved_model_dir, input_path, output_path in zip(*[iter(paths)] * 3):
        if saved_model_dir not in signatures:
            signatures[saved_model_dir] = tf.saved_model.load(
                saved_model_dir).signatures["serving_default"]
        signature = signatures[saved_model_dir]
        (input_name,) = signature.structured_input_signature[1]
        values = np.load(input_path, allow_pickle=True)
        if values.dtype == object:
            values = tf.constant([value if isinstance(value, bytes) else
                                  str(value).encode("utf-8") for value in values],
                                 tf.string, shape=[len(values)])
        outputs = signature(**{input_name: tf.constant(values)})
        np.save(output_path, np.stack([np.asarray(outputs[name], np.float64)
                                       for name in sorted(outputs)]))
    assert not any(m.split(".")[0] in PROJECT_PACKAGES for m in sys.modules)


if __name__ == "__main__":
    main(*sys.argv[1:])
