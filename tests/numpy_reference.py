"""Independent NumPy implementations of the paper's formulas, for the tests."""

import math

import numpy as np


def softmax(x, axis=-1):
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def top_k_gates(logits, k):
    """G(x) = softmax(KeepTopK(logits, k)) as a dense `[tokens, n]` array."""
    gates = np.zeros_like(logits, dtype=np.float64)
    for t, row in enumerate(logits):
        chosen = np.argsort(-row, kind="stable")[:k]
        gates[t, chosen] = softmax(row[chosen].astype(np.float64))
    return gates


def kth_excluding(values, k):
    """For each i: the k-th largest of the row with entry i removed."""
    out = np.zeros_like(values)
    for t, row in enumerate(values):
        for i in range(row.shape[0]):
            rest = np.sort(np.delete(row, i))[::-1]
            out[t, i] = rest[k - 1]
    return out


def normal_cdf(z):
    return 0.5 * np.vectorize(math.erfc)(-np.asarray(z, np.float64) / math.sqrt(2.0))


def softplus(x):
    return np.logaddexp(0.0, x)


def cv_squared(values, epsilon=1e-10):
    values = np.asarray(values, np.float64)
    if values.size == 1:
        return 0.0
    return values.var() / (values.mean() ** 2 + epsilon)


def expert_ffn(x, kernel_in, bias_in, kernel_out, bias_out):
    """One expert: relu(x W1 + b1) W2 + b2."""
    return np.maximum(x @ kernel_in + bias_in, 0.0) @ kernel_out + bias_out


def moe_output(tokens, dense_gates, kernel_in, bias_in, kernel_out, bias_out):
    """y = sum_i G(x)_i E_i(x), evaluating expert i only where G(x)_i != 0."""
    out = np.zeros((tokens.shape[0], kernel_out.shape[-1]))
    for t in range(tokens.shape[0]):
        for e in np.nonzero(dense_gates[t])[0]:
            out[t] += dense_gates[t, e] * expert_ffn(
                tokens[t], kernel_in[e], bias_in[e], kernel_out[e], bias_out[e])
    return out
