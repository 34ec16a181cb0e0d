"""Runs a SavedModel in a process where the project's packages cannot be imported.

Usage: python saved_model_runner.py SAVED_MODEL_DIR ENDPOINT INPUT.npy OUTPUT.npy
Used by test_saved_model.py to show that a served model needs only TensorFlow.
"""

import importlib.abc
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class _BlockProjectPackages(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("moe_tf", "models", "train"):
            raise ImportError(f"{name} must not be needed to serve the SavedModel")
        return None


def main(saved_model_dir, endpoint, input_path, output_path):
    sys.meta_path.insert(0, _BlockProjectPackages())
    import numpy as np
    import tensorflow as tf

    loaded = tf.saved_model.load(saved_model_dir)
    fn = getattr(loaded, endpoint) if endpoint != "serving_default" else \
        loaded.signatures["serving_default"]
    result = fn(tf.constant(np.load(input_path)))
    if isinstance(result, dict):
        (result,) = result.values()
    np.save(output_path, result.numpy())
    assert not any(m.split(".")[0] in ("moe_tf", "models", "train") for m in sys.modules)


if __name__ == "__main__":
    main(*sys.argv[1:])
