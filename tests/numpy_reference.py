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


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


ACTIVATIONS = {
    "relu": lambda x: np.maximum(x, 0.0),
    "silu": lambda x: x * sigmoid(x),
    "gelu": lambda x: 0.5 * x * (1.0 + np.vectorize(math.erf, otypes=[float])(
        x / math.sqrt(2.0))),
}


def gated_expert_ffn(x, kernel_in, bias_in, kernel_out, bias_out, *, activation="relu",
                     gated=None):
    """One expert of any kind: act(x W1 + b1) W2 + b2; with gated="glu" W1 x + b1 is
    [gate | up] and the hidden units act(gate) * up; with "gpt_oss" they are
    g sigmoid(1.702 g) (u + 1) for g = min(gate, 7), u = clip(up, -7, 7)."""
    pre = x @ kernel_in + bias_in
    if gated is None:
        hidden = ACTIVATIONS[activation](pre)
    else:
        gate, up = np.split(pre, 2, axis=-1)
        if gated == "glu":
            hidden = ACTIVATIONS[activation](gate) * up
        else:
            gate, up = np.minimum(gate, 7.0), np.clip(up, -7.0, 7.0)
            hidden = gate * sigmoid(1.702 * gate) * (up + 1.0)
    return hidden @ kernel_out + bias_out


def numerical_gradient(function, value, epsilon=1e-6):
    """d function() / d value (a float64 array changed in place and restored), by
    central differences."""
    grad = np.zeros_like(value)
    for index in np.ndindex(value.shape):
        saved = value[index]
        value[index] = saved + epsilon
        plus = function()
        value[index] = saved - epsilon
        minus = function()
        value[index] = saved
        grad[index] = (plus - minus) / (2 * epsilon)
    return grad


def moe_output(tokens, dense_gates, kernel_in, bias_in, kernel_out, bias_out):
    """y = sum_i G(x)_i E_i(x), evaluating expert i only where G(x)_i != 0."""
    out = np.zeros((tokens.shape[0], kernel_out.shape[-1]))
    for t in range(tokens.shape[0]):
        for e in np.nonzero(dense_gates[t])[0]:
            out[t] += dense_gates[t, e] * expert_ffn(
                tokens[t], kernel_in[e], bias_in[e], kernel_out[e], bias_out[e])
    return out


def sorted_rows_ffn_and_gradients(rows, expert_row_counts, d_outputs, kernel_in, bias_in,
                                  kernel_out, bias_out):
    """Each expert's FFN on its block of sorted rows, and the gradients of
    sum(outputs * d_outputs) for the rows and every weight. Rows after the last
    expert's are padding: zero outputs and zero gradients."""
    outputs = np.zeros((rows.shape[0], kernel_out.shape[-1]))
    grads = [np.zeros(rows.shape), np.zeros(kernel_in.shape), np.zeros(bias_in.shape),
             np.zeros(kernel_out.shape), np.zeros(bias_out.shape)]
    begin = 0
    for e, size in enumerate(expert_row_counts):
        x, dy = rows[begin:begin + size], d_outputs[begin:begin + size]
        pre = x @ kernel_in[e] + bias_in[e]
        act = np.maximum(pre, 0.0)
        outputs[begin:begin + size] = act @ kernel_out[e] + bias_out[e]
        d_pre = (dy @ kernel_out[e].T) * (pre > 0)
        grads[0][begin:begin + size] = d_pre @ kernel_in[e].T
        grads[1][e], grads[2][e] = x.T @ d_pre, d_pre.sum(axis=0)
        grads[3][e], grads[4][e] = act.T @ dy, dy.sum(axis=0)
        begin += size
    return outputs, grads


def capacity_positions(expert_index, gate, num_experts):
    """GShard's buffer positions of slot routing `expert_index`, `gate` (`[tokens, k]`):
    every token's first choice is placed before any token's second choice, and within a
    choice rank earlier tokens come first. -1 for unused slots (gate 0); a position of
    `capacity` or more means the slot is dropped."""
    position = np.full(np.shape(gate), -1)
    filled = np.zeros(num_experts, int)
    for rank in range(np.shape(gate)[1]):
        for token in range(np.shape(gate)[0]):
            if gate[token, rank] > 0:
                expert = expert_index[token, rank]
                position[token, rank] = filled[expert]
                filled[expert] += 1
    return position


def routed_ffn_and_gradients(tokens, token_index, expert_index, gate, d_outputs,
                             kernel_in, bias_in, kernel_out, bias_out):
    """y_t = sum over the assignments a of token t of gate[a] * expert_ffn(x_t) of the
    assignment's expert, and the gradients of sum(y * d_outputs): of the tokens, of each
    assignment's gate, and of every weight."""
    outputs = np.zeros((tokens.shape[0], kernel_out.shape[-1]))
    d_tokens, d_gate = np.zeros(tokens.shape), np.zeros(len(gate))
    d_weights = [np.zeros(w.shape) for w in (kernel_in, bias_in, kernel_out, bias_out)]
    for a, (t, e, g) in enumerate(zip(token_index, expert_index, gate)):
        pre = tokens[t] @ kernel_in[e] + bias_in[e]
        act = np.maximum(pre, 0.0)
        out = act @ kernel_out[e] + bias_out[e]
        outputs[t] += g * out
        d_gate[a] = d_outputs[t] @ out
        dy = g * d_outputs[t]
        d_pre = (kernel_out[e] @ dy) * (pre > 0)
        d_tokens[t] += kernel_in[e] @ d_pre
        d_weights[0][e] += np.outer(tokens[t], d_pre)
        d_weights[1][e] += d_pre
        d_weights[2][e] += np.outer(act, dy)
        d_weights[3][e] += dy
    return outputs, d_tokens, d_gate, d_weights
