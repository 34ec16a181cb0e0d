"""Writing a SavedModel so that readers never see a half-written one."""

import tensorflow as tf


def save_atomically(module: tf.Module, path: str, signatures) -> None:
    """Writes a SavedModel beside `path`, then swaps it in (no half-written export)."""
    tmp = path.rstrip("/") + ".tmp"
    if tf.io.gfile.exists(tmp):
        tf.io.gfile.rmtree(tmp)
    tf.saved_model.save(module, tmp, signatures=signatures)
    if tf.io.gfile.exists(path):
        tf.io.gfile.rmtree(path)
    tf.io.gfile.rename(tmp, path)
