"""Writing a SavedModel so that readers never see a half-written one, with its MoE
experts stored as asked."""

import keras
import tensorflow as tf

from moe_tf import SparselyGatedMoE


def quantize_experts(model: keras.Model, storage: str) -> None:
    """Stores the experts' kernels of every MoE layer of `model` in `storage`
    ("float32": unchanged; "bfloat16" or "int8", see
    `SparselyGatedMoE.quantize_experts`). For export, after training."""
    if storage == "float32":
        return
    for layer in model._flatten_layers():
        if isinstance(layer, SparselyGatedMoE):
            layer.quantize_experts(storage)


def save_atomically(module: tf.Module, path: str, signatures) -> None:
    """Writes a SavedModel beside `path`, then swaps it in (no half-written export)."""
    tmp = path.rstrip("/") + ".tmp"
    if tf.io.gfile.exists(tmp):
        tf.io.gfile.rmtree(tmp)
    tf.saved_model.save(module, tmp, signatures=signatures)
    if tf.io.gfile.exists(path):
        tf.io.gfile.rmtree(path)
    tf.io.gfile.rename(tmp, path)
