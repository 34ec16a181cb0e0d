"""The dispatchers (moe_tf/dispatch.py) on a tiny FeedForwardExperts against NumPy:
outputs and gradients of the dropless sparse dispatch and of the capacity dispatch (with
drops and token groups), batches without tokens, and the capacity per expert."""

import math

import numpy as np
import pytest
import tensorflow as tf

from moe_tf import FeedForwardExperts
from moe_tf.dispatch import (CapacityDispatch, capacity_dispatch, expert_capacity,
                             gathered_weights_dispatch,
                             sparse_dispatch)
from moe_tf.routing import DenseRouting, SlotRouting
from tests import numpy_reference as ref

NUM_EXPERTS, D_IN, HIDDEN, D_OUT = 3, 4, 5, 2


def tiny_experts(seed=0):
    experts = FeedForwardExperts(num_experts=NUM_EXPERTS, hidden_size=HIDDEN,
                                 output_size=D_OUT)
    experts.build((None, D_IN))
    rng = np.random.default_rng(seed)
    for weight in experts.weights:
        weight.assign(rng.normal(size=weight.shape))
    return experts


def slot_problem(num_tokens, seed=1):
    """Tokens, 2 distinct experts per token, gates; some unused slots and a masked token."""
    rng = np.random.default_rng(seed)
    expert_index = np.array([rng.permutation(NUM_EXPERTS)[:2] for _ in range(num_tokens)],
                            np.int32).reshape(num_tokens, 2)
    gate = rng.uniform(0.2, 1.0, size=(num_tokens, 2))
    if num_tokens > 3:
        gate[1, 1] = 0      # an unused slot
        gate[3] = 0         # a masked token
    return (rng.normal(size=(num_tokens, D_IN)), expert_index, gate,
            rng.normal(size=(num_tokens, D_OUT)))


def to_dense(expert_index, gate):
    """`[tokens, experts]` from per-slot values (0 for unused slots): a token's experts
    are distinct, so each pair has at most one slot."""
    dense = np.zeros((len(gate), NUM_EXPERTS))
    for t, k in zip(*np.nonzero(gate)):
        dense[t, expert_index[t, k]] = gate[t, k]
    return dense


def run(dispatcher, experts, tokens, make_routing, gate, d_outputs, graph=False,
        **kwargs):
    """Outputs and the gradients of sum(outputs * d_outputs): tokens, gate, weights;
    traced as a tf.function when `graph`."""
    def step(x, g):
        with tf.GradientTape() as tape:
            tape.watch([x, g])
            y = dispatcher(x, make_routing(g), experts, **kwargs)
            if isinstance(y, CapacityDispatch):
                y = y.outputs
            loss = tf.reduce_sum(y * tf.constant(d_outputs, tf.float32))
        return [y, *tape.gradient(loss, [x, g, *experts.weights])]

    return (tf.function(step) if graph else step)(tf.constant(tokens, tf.float32),
                                                  tf.constant(gate, tf.float32))


def numpy_routed(experts, tokens, expert_index, gate, d_outputs, keep=None):
    """NumPy outputs and gradients of the slot routing's assignments (those `keep`
    marks, `[tokens, slots]`, when given), laid out as `run` returns them."""
    used = (gate > 0) if keep is None else keep & (gate > 0)
    t, k = np.nonzero(used)
    weights = [w.numpy().astype(np.float64) for w in experts.weights]
    y, d_tokens, d_gate, d_weights = ref.routed_ffn_and_gradients(
        tokens, t, expert_index[t, k], gate[t, k], d_outputs, *weights)
    d_slot_gate = np.zeros(gate.shape)
    d_slot_gate[t, k] = d_gate
    return y, d_tokens, d_slot_gate, d_weights


def assert_close(got, want_y, want_d_tokens, want_d_gate, want_d_weights):
    names = ["outputs", "d_tokens", "d_gate", "d_kernel_in", "d_bias_in", "d_kernel_out",
             "d_bias_out"]
    for value, want, name in zip(got, [want_y, want_d_tokens, want_d_gate,
                                       *want_d_weights], names):
        np.testing.assert_allclose(value.numpy(), want, rtol=1e-5, atol=1e-5, err_msg=name)


def slot_routing_of(expert_index):
    return lambda g: SlotRouting(tf.constant(expert_index, tf.int32), g, NUM_EXPERTS)


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("form", ["slot", "dense"])
def test_sparse_dispatch_matches_numpy(form, graph):
    experts = tiny_experts()
    tokens, expert_index, gate, d_outputs = slot_problem(9)
    y, d_tokens, d_gate, d_weights = numpy_routed(experts, tokens, expert_index, gate,
                                                  d_outputs)
    if form == "slot":
        got = run(sparse_dispatch, experts, tokens, slot_routing_of(expert_index), gate,
                  d_outputs, graph)
    else:
        got = run(sparse_dispatch, experts, tokens, DenseRouting,
                  to_dense(expert_index, gate), d_outputs, graph)
        # Unused pairs get no gate gradient on the sparse path: no expert computes them.
        d_gate = to_dense(expert_index, d_gate)
    assert_close(got, y, d_tokens, d_gate, d_weights)


def _forward(dispatcher, experts, tokens, routing, graph, **kwargs):
    call = lambda x: dispatcher(x, routing, experts, **kwargs)  # noqa: E731
    return (tf.function(call) if graph else call)(tf.constant(tokens, tf.float32)).numpy()


@pytest.mark.parametrize("graph", [False, True], ids=["eager", "graph"])
@pytest.mark.parametrize("form", ["slot", "dense"])
def test_gathered_weights_dispatch_matches_numpy(form, graph):
    experts = tiny_experts()
    tokens, expert_index, gate, d_outputs = slot_problem(9)
    y, *_ = numpy_routed(experts, tokens, expert_index, gate, d_outputs)
    routing = (SlotRouting(tf.constant(expert_index), tf.constant(gate, tf.float32),
                           NUM_EXPERTS) if form == "slot" else
               DenseRouting(tf.constant(to_dense(expert_index, gate), tf.float32)))
    got = _forward(gathered_weights_dispatch, experts, tokens, routing, graph)
    np.testing.assert_allclose(got, y, rtol=1e-5, atol=1e-5)
    # sparse_dispatch takes it up to its threshold, and sorts above it.
    for up_to in (0, 17, 18, 100):
        got = _forward(sparse_dispatch, experts, tokens, routing, graph,
                       gathered_weights_up_to=up_to)
        np.testing.assert_allclose(got, y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("experts_kind", ["int8", "bfloat16", "swiglu without biases"])
def test_gathered_weights_dispatch_equals_sorted_rows(experts_kind):
    if experts_kind == "swiglu without biases":
        experts = FeedForwardExperts(num_experts=NUM_EXPERTS, hidden_size=HIDDEN,
                                     output_size=D_OUT, activation="silu", gated="glu",
                                     use_bias=False)
        experts.build((None, D_IN))
        rng = np.random.default_rng(2)
        for weight in experts.weights:
            weight.assign(rng.normal(size=weight.shape))
    else:
        experts = tiny_experts()
        experts.quantize_kernels(experts_kind)
    tokens, expert_index, gate, _ = slot_problem(9)
    routing = SlotRouting(tf.constant(expert_index), tf.constant(gate, tf.float32),
                          NUM_EXPERTS)
    np.testing.assert_allclose(
        _forward(gathered_weights_dispatch, experts, tokens, routing, False),
        _forward(sparse_dispatch, experts, tokens, routing, False), rtol=1e-5, atol=1e-5)
    zero = SlotRouting(tf.zeros([0, 2], tf.int32), tf.zeros([0, 2]), NUM_EXPERTS)
    assert _forward(gathered_weights_dispatch, experts, np.zeros((0, D_IN)), zero,
                    False).shape == (0, D_OUT)


def test_capacity_dispatch_drops_second_choices_first_and_matches_numpy():
    experts = tiny_experts()
    tokens, expert_index, gate, d_outputs = slot_problem(9)
    capacity = 2
    position = ref.capacity_positions(expert_index, gate, NUM_EXPERTS)
    keep = position < capacity
    assert np.sum((gate > 0) & ~keep) >= 3                 # some assignments are dropped
    got = run(capacity_dispatch, experts, tokens, slot_routing_of(expert_index), gate,
              d_outputs, capacity=capacity)
    assert_close(got, *numpy_routed(experts, tokens, expert_index, gate, d_outputs, keep))
    assert_dropped_fraction(experts, tokens, slot_routing_of(expert_index)(tf.constant(gate, tf.float32)),
                            gate > 0,
                            keep, capacity=capacity)


def assert_dropped_fraction(experts, tokens, routing, used, keep, **kwargs):
    """The dispatch reports the share of the used assignments it did not keep."""
    result = capacity_dispatch(tf.constant(tokens, tf.float32), routing, experts, **kwargs)
    np.testing.assert_allclose(result.dropped_fraction,
                               np.sum(used & ~keep) / np.sum(used), rtol=1e-6)


def test_dense_capacity_dispatch_takes_earlier_tokens_first():
    experts = tiny_experts()
    tokens, expert_index, gate, d_outputs = slot_problem(9)
    dense = to_dense(expert_index, gate)
    capacity = 2
    # Each expert keeps its first `capacity` tokens in token order.
    keep_dense = (np.cumsum(dense > 0, axis=0) <= capacity) & (dense > 0)
    keep = np.array([[keep_dense[t, e] for e in expert_index[t]] for t in range(9)])
    y, d_tokens, d_gate, d_weights = numpy_routed(experts, tokens, expert_index, gate,
                                                  d_outputs, keep)
    got = run(capacity_dispatch, experts, tokens, DenseRouting, dense, d_outputs,
              capacity=capacity)
    assert_dropped_fraction(experts, tokens, DenseRouting(tf.constant(dense, tf.float32)),
                            dense > 0, keep_dense, capacity=capacity)
    # Dropped and unused pairs: the combine has no slot for them, so no gate gradient.
    assert_close(got, y, d_tokens, to_dense(expert_index, d_gate), d_weights)


@pytest.mark.parametrize("token_group_size", [3, 4])
def test_capacity_dispatch_in_token_groups_matches_numpy(token_group_size):
    experts = tiny_experts()
    tokens, expert_index, gate, d_outputs = slot_problem(9)   # the last group padded
    capacity = 1
    keep = np.zeros(gate.shape, bool)
    for start in range(0, 9, token_group_size):
        part = slice(start, start + token_group_size)
        keep[part] = ref.capacity_positions(expert_index[part], gate[part],
                                            NUM_EXPERTS) < capacity
    whole_batch = ref.capacity_positions(expert_index, gate, NUM_EXPERTS) < capacity
    assert np.any(keep & ~whole_batch & (gate > 0))    # each group has its own slots
    got = run(capacity_dispatch, experts, tokens, slot_routing_of(expert_index), gate,
              d_outputs, capacity=capacity, token_group_size=token_group_size)
    assert_close(got, *numpy_routed(experts, tokens, expert_index, gate, d_outputs, keep))
    assert_dropped_fraction(experts, tokens, slot_routing_of(expert_index)(tf.constant(gate, tf.float32)),
                            gate > 0,
                            keep, capacity=capacity, token_group_size=token_group_size)


@pytest.mark.parametrize("dispatch", ["sparse", "capacity", "capacity in token groups"])
@pytest.mark.parametrize("form", ["slot", "dense"])
def test_no_tokens(dispatch, form):
    experts = tiny_experts()
    tokens, expert_index, gate, d_outputs = slot_problem(0)
    make_routing = slot_routing_of(expert_index) if form == "slot" else DenseRouting
    if form == "dense":
        gate = np.zeros((0, NUM_EXPERTS))
    kwargs = {"sparse": {}, "capacity": dict(capacity=1),
              "capacity in token groups": dict(capacity=1, token_group_size=4)}[dispatch]
    dispatcher = sparse_dispatch if dispatch == "sparse" else capacity_dispatch
    y, d_tokens, d_gate, *d_weights = run(dispatcher, experts, tokens, make_routing, gate,
                                          d_outputs, **kwargs)
    assert y.shape == (0, D_OUT) and d_tokens.shape == (0, D_IN)
    assert d_gate.shape == gate.shape
    for d_weight, weight in zip(d_weights, experts.weights):
        np.testing.assert_array_equal(d_weight, np.zeros(weight.shape))


@pytest.mark.parametrize("num_tokens, k, num_experts, factor", [
    (10, 2, 4, 1.0),      # ceil(5) = 5
    (10, 2, 4, 1.25),     # ceil(6.25) = 7
    (3, 2, 1, 2.0),       # 12 wanted, at most the 3 tokens
    (1, 1, 8, 1.0),       # ceil(0.125) = 1
    (0, 2, 4, 2.0),       # no tokens: still one slot
])
def test_expert_capacity(num_tokens, k, num_experts, factor):
    want = max(1, min(num_tokens, math.ceil(factor * num_tokens * k / num_experts)))
    got = expert_capacity(num_tokens, k, num_experts, factor)
    assert isinstance(got, int) and got == want
    assert int(expert_capacity(tf.constant(num_tokens), k, num_experts, factor)) == want
