"""The training loss of every binary: next-token NLL over the real (non-padding) labels."""

import tensorflow as tf

from models.special_tokens import PAD_ID


def masked_nll_sums(logits, labels):
    """The summed NLL of the real labels and their count.

    Args:
        logits: float `[..., vocab]`.
        labels: int `logits.shape[:-1]`; PAD_ID marks padding, which does not count.

    Returns:
        `(mean_nll, nll_sum, num_tokens)`, float scalars, as `train.training.loop`'s
        `loss_fn` returns them (the mean is 0 for a batch without real labels).
    """
    nll = tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits)
    real = tf.cast(labels != PAD_ID, nll.dtype)
    nll_sum = tf.reduce_sum(nll * real)
    num_tokens = tf.reduce_sum(real)
    return nll_sum / tf.maximum(num_tokens, 1.0), nll_sum, num_tokens
