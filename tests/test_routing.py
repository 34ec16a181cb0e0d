"""The two routings (moe_tf/routing.py) on small exact inputs against NumPy: assignments,
per-token sums and offsets, balance statistics, dense gates, GShard capacity masks and
token groups."""

import numpy as np
import pytest
import tensorflow as tf

from moe_tf.routing import DenseRouting, SlotRouting, split_into_token_groups
from tests import numpy_reference as ref

NUM_EXPERTS = 4
# 5 tokens, 2 slots: token 1's second slot is unused, token 3 is masked (no slots).
EXPERT_INDEX = np.array([[2, 0], [1, 3], [0, 2], [3, 1], [2, 3]], np.int32)
SLOT_GATE = np.array([[.75, .25], [.5, 0.], [.625, .375], [0., 0.], [.875, .125]],
                     np.float32)


def slot_routing(expert_index=EXPERT_INDEX, gate=SLOT_GATE, num_experts=NUM_EXPERTS):
    return SlotRouting(tf.constant(expert_index, tf.int32), tf.constant(gate, tf.float32),
                       num_experts)


def dense_of(expert_index, gate, num_experts):
    """NumPy `[tokens, experts]` gates of a slot routing."""
    dense = np.zeros((len(gate), num_experts), np.float32)
    for t, k in zip(*np.nonzero(gate)):
        dense[t, expert_index[t, k]] += gate[t, k]
    return dense


DENSE_GATE = dense_of(EXPERT_INDEX, SLOT_GATE, NUM_EXPERTS)


def test_slot_assignments_are_token_major_with_unused_slots_past_the_experts():
    got = slot_routing().assignments()
    tokens, slots = EXPERT_INDEX.shape
    np.testing.assert_array_equal(got.token_index, np.arange(tokens * slots) // slots)
    np.testing.assert_array_equal(
        got.expert_index, np.where(SLOT_GATE > 0, EXPERT_INDEX, NUM_EXPERTS).reshape(-1))
    np.testing.assert_array_equal(got.gate, SLOT_GATE.reshape(-1))


def test_dense_assignments_are_the_used_pairs_token_major():
    got = DenseRouting(tf.constant(DENSE_GATE)).assignments()
    tokens, experts = np.nonzero(DENSE_GATE)       # row-major: token, then expert
    np.testing.assert_array_equal(got.token_index, tokens)
    np.testing.assert_array_equal(got.expert_index, experts)
    np.testing.assert_array_equal(got.gate, DENSE_GATE[tokens, experts])


@pytest.mark.parametrize("routing", [slot_routing(), DenseRouting(tf.constant(DENSE_GATE))],
                         ids=["slot", "dense"])
def test_sum_per_token_and_token_offsets(routing):
    assignments = routing.assignments()
    token_index = assignments.token_index.numpy()
    values = np.arange(len(token_index) * 3, dtype=np.float32).reshape(-1, 3) ** 2
    want = np.zeros((len(DENSE_GATE), 3), np.float32)
    np.add.at(want, token_index, values)
    np.testing.assert_array_equal(routing.sum_per_token(tf.constant(values)), want)

    offsets = routing.token_offsets().numpy()
    counts = np.bincount(token_index, minlength=len(DENSE_GATE))
    np.testing.assert_array_equal(offsets, np.concatenate([[0], np.cumsum(counts)]))
    for t in range(len(DENSE_GATE)):   # token t's assignments lie in its offsets' range
        np.testing.assert_array_equal(token_index[offsets[t]:offsets[t + 1]], t)


@pytest.mark.parametrize("routing", [slot_routing(), DenseRouting(tf.constant(DENSE_GATE))],
                         ids=["slot", "dense"])
def test_balance_statistics_and_dense_gates(routing):
    np.testing.assert_array_equal(routing.dense_gates(), DENSE_GATE)
    # Each token goes to at most one slot per expert here: counts are used pairs.
    np.testing.assert_array_equal(routing.expert_counts(), [2, 1, 3, 1])
    np.testing.assert_array_equal(routing.expert_counts(), np.sum(DENSE_GATE > 0, axis=0))
    np.testing.assert_allclose(routing.importance(), [.875, .5, 2.0, .125])
    np.testing.assert_allclose(routing.importance(), DENSE_GATE.sum(axis=0))


def capacity_masks(routing, capacity, token_group_size=None):
    """The one-hot dispatch and combine tensors `[(groups,) tokens, experts, capacity]`
    that `routing.capacity_slots` describes: dispatch[t, e, c] = 1 where slot (e, c) holds
    token t, combine = dispatch * the slot's gate. Also checks the empty slots."""
    grouped = routing.in_token_groups(token_group_size)
    slots = grouped.capacity_slots(capacity)
    token_index, gate = slots.token_index.numpy(), slots.gate.numpy()
    groups, size = grouped.gate.shape[0], grouped.gate.shape[1]
    dispatch = np.zeros((groups, size, routing.num_experts, capacity), np.float32)
    g, e, c = np.nonzero(token_index < size)
    dispatch[g, token_index[g, e, c], e, c] = 1
    empty = token_index == size
    np.testing.assert_array_equal(gate[empty], 0.0)
    assert np.all(token_index <= size)
    used = float(np.sum(grouped.gate.numpy() > 0))
    assert slots.num_used.numpy() == used
    assert slots.num_kept.numpy() == np.sum(~empty)
    combine = dispatch.copy()
    combine[g, token_index[g, e, c], e, c] = gate[g, e, c]
    if token_group_size is None:
        return dispatch[0], combine[0]
    return dispatch, combine


def numpy_capacity_masks(expert_index, gate, num_experts, capacity):
    """Dispatch and combine `[tokens, experts, capacity]` from `ref.capacity_positions`."""
    position = ref.capacity_positions(expert_index, gate, num_experts)
    dispatch = np.zeros((len(gate), num_experts, capacity), np.float32)
    combine = np.zeros_like(dispatch)
    for t, k in zip(*np.nonzero((position >= 0) & (position < capacity))):
        dispatch[t, expert_index[t, k], position[t, k]] = 1
        combine[t, expert_index[t, k], position[t, k]] = gate[t, k]
    return dispatch, combine


def test_slot_capacity_masks_place_every_first_choice_before_any_second_choice():
    # Capacity 2. First choices: t0, t2 fill expert 0; t3's first choice is dropped.
    # Second choices: t1's (expert 0) is dropped although t1 comes before t3; t0's and
    # t3's second choices fill expert 1 after t1's first, t2's is dropped.
    expert_index = np.array([[0, 1], [1, 0], [0, 1], [0, 2]], np.int32)
    gate = np.array([[.5, .5], [.75, .25], [.625, .375], [.875, .125]], np.float32)
    dispatch, combine = capacity_masks(slot_routing(expert_index, gate, 3), 2)
    placed = {(t, e, c) for t, e, c in zip(*np.nonzero(dispatch))}
    assert placed == {(0, 0, 0), (1, 1, 0), (2, 0, 1), (0, 1, 1), (3, 2, 0)}
    np.testing.assert_array_equal(combine, dispatch * dense_of(
        expert_index, gate, 3)[..., None])


@pytest.mark.parametrize("capacity", [1, 2, 3, 5])
def test_slot_capacity_masks_match_numpy(capacity):
    rng = np.random.default_rng(capacity)
    expert_index = np.stack([rng.permutation(5)[:3] for _ in range(9)]).astype(np.int32)
    gate = rng.uniform(0.1, 1.0, size=(9, 3)).astype(np.float32)
    gate[2, 0] = gate[6] = 0                    # an unused first choice, a masked token
    dispatch, combine = capacity_masks(
        slot_routing(expert_index, gate, 5), capacity)
    want_dispatch, want_combine = numpy_capacity_masks(expert_index, gate, 5, capacity)
    np.testing.assert_array_equal(dispatch, want_dispatch)
    np.testing.assert_allclose(combine, want_combine, rtol=1e-6)


def numpy_dense_capacity_masks(dense_gate, capacity):
    """Dispatch and combine `[tokens, experts, capacity]`: each expert takes its first
    `capacity` tokens in token order."""
    dispatch = np.zeros((*dense_gate.shape, capacity), np.float32)
    for e in range(dense_gate.shape[1]):
        for position, t in enumerate(np.nonzero(dense_gate[:, e])[0][:capacity]):
            dispatch[t, e, position] = 1
    return dispatch, dispatch * dense_gate[..., None]


@pytest.mark.parametrize("capacity", [1, 2, 4])
def test_dense_capacity_masks_take_earlier_tokens_first(capacity):
    dispatch, combine = capacity_masks(DenseRouting(tf.constant(DENSE_GATE)),
                                       capacity)
    want_dispatch, want_combine = numpy_dense_capacity_masks(DENSE_GATE, capacity)
    np.testing.assert_array_equal(dispatch, want_dispatch)
    np.testing.assert_array_equal(combine, want_combine)
    if capacity == 1:   # expert 2: token 0 kept, tokens 2 and 4 dropped
        np.testing.assert_array_equal(dispatch[:, 2, 0], [1, 0, 0, 0, 0])


def test_split_into_token_groups_pads_the_last_group_with_zeros():
    values = np.arange(10, dtype=np.float32).reshape(5, 2) + 1
    got = split_into_token_groups(tf.constant(values), 2).numpy()
    assert got.shape == (3, 2, 2)
    np.testing.assert_array_equal(got.reshape(6, 2), np.concatenate([values, [[0, 0]]]))
    np.testing.assert_array_equal(split_into_token_groups(tf.constant(values), 5),
                                  values[None])


# 5 tokens in groups of 2 (one padding token) or 3 (one); in the first group of 3,
# expert 0 gets token 0's second choice and token 2's first: capacity 1 drops one.
@pytest.mark.parametrize("size, padding", [(2, 1), (3, 1)])
@pytest.mark.parametrize("capacity", [1, 2])
def test_token_groups_fill_their_own_buffers(size, padding, capacity):
    slot, dense = slot_routing(), DenseRouting(tf.constant(DENSE_GATE))
    grouped_slot, grouped_dense = slot.in_token_groups(size), dense.in_token_groups(size)
    groups = (len(SLOT_GATE) + padding) // size
    assert grouped_slot.gate.shape == (groups, size, 2)
    assert grouped_dense.gate.shape == (groups, size, NUM_EXPERTS)
    assert grouped_slot.num_experts == grouped_dense.num_experts == NUM_EXPERTS
    np.testing.assert_array_equal(grouped_slot.gate[-1, -1], [0, 0])  # padding: unused
    np.testing.assert_array_equal(grouped_slot.expert_index[-1, -1], [0, 0])
    np.testing.assert_array_equal(grouped_dense.gate[-1, -1], np.zeros(NUM_EXPERTS))

    padded_index = np.concatenate([EXPERT_INDEX, np.zeros((padding, 2), np.int32)])
    padded_gate = np.concatenate([SLOT_GATE, np.zeros((padding, 2), np.float32)])
    padded_dense = np.concatenate([DENSE_GATE,
                                   np.zeros((padding, NUM_EXPERTS), np.float32)])
    slot_masks = capacity_masks(slot, capacity, size)
    dense_masks = capacity_masks(dense, capacity, size)
    for g in range(groups):
        part = slice(g * size, (g + 1) * size)
        want_slot = numpy_capacity_masks(padded_index[part], padded_gate[part],
                                         NUM_EXPERTS, capacity)
        want_dense = numpy_dense_capacity_masks(padded_dense[part], capacity)
        for got, want in zip([*slot_masks, *dense_masks], [*want_slot, *want_dense]):
            np.testing.assert_allclose(got[g], want, rtol=1e-6)


def test_no_tokens():
    slot = slot_routing(np.zeros((0, 2), np.int32), np.zeros((0, 2), np.float32))
    dense = DenseRouting(tf.zeros([0, NUM_EXPERTS]))
    for routing in (slot, dense):
        assert routing.assignments().gate.shape == (0,)
        np.testing.assert_array_equal(routing.token_offsets(), [0])
        np.testing.assert_array_equal(routing.expert_counts(), np.zeros(NUM_EXPERTS))
        assert routing.sum_per_token(tf.zeros([0, 3])).shape == (0, 3)
        assert all(m.shape == (0, NUM_EXPERTS, 2) for m in capacity_masks(routing, 2))
        slots = routing.in_token_groups(None).capacity_slots(2)
        # One group of no tokens: every slot empty (the empty token, index 0).
        np.testing.assert_array_equal(slots.token_index, np.zeros((1, NUM_EXPERTS, 2)))
        assert slots.num_used.numpy() == slots.num_kept.numpy() == 0
