"""The compiled kernels (moe_tf/kernels) against NumPy, on their own and as the
layer's training path: the experts' FFNs on sorted rows and the sparse dispatch's per-token
sums."""

import numpy as np
import pytest
import tensorflow as tf

from moe_tf import FeedForwardExperts, SparselyGatedMoE
from moe_tf import kernels
from moe_tf.kernels import build
from tests import numpy_reference as ref

pytestmark = pytest.mark.skipif(build.why_not_buildable() is not None,
                                reason=f"the kernels are not built here: "
                                       f"{build.why_not_buildable()}")


def ops():
    library = kernels.op_library()
    assert library is not None, (
        f"{kernels.LIBRARY} is missing: `make test` builds it (python -m moe_tf.kernels.build)")
    return library


def op_types(concrete_function):
    """The op types of a traced function, the custom gradients' functions included."""
    graph = concrete_function.graph
    return {op.type for g in [graph, *(f.graph for f in graph._functions.values())]
            for op in g.get_operations()}


def pretend_a_gpu_is_visible(monkeypatch):
    """This machine has no GPU; what the layer sees on one is a non-empty device list."""
    monkeypatch.setattr(tf.config, "list_logical_devices",
                        lambda kind=None: ["/device:GPU:0"] if kind == "GPU" else [])


def random_problem(expert_row_counts, d_in, hidden, d_out, padding_rows=3, seed=0):
    rng = np.random.default_rng(seed)
    num_experts, num_rows = len(expert_row_counts), sum(expert_row_counts) + padding_rows
    # Kernels scaled by 1/sqrt(fan-in) keep every value about 1, so that the tolerances
    # mean the same at every width.
    weights = [rng.normal(size=shape) / np.sqrt(fan_in) for shape, fan_in in (
        ((num_experts, d_in, hidden), d_in), ((num_experts, hidden), 1),
        ((num_experts, hidden, d_out), hidden), ((num_experts, d_out), 1))]
    return rng.normal(size=(num_rows, d_in)), rng.normal(size=(num_rows, d_out)), weights


def test_the_other_instruction_sets_compile(tmp_path):
    """simd.h's branches for the instruction sets this CPU lacks are compiled here too
    (they cannot run here; the tests below run this CPU's). The XLA glue has no vector
    code of its own, and its headers take most of a build's time: left out."""
    others = [march for march, _ in kernels.TARGETS if march != kernels.target_march()]
    vector_code = [s for s in build.SOURCES if not s.endswith("xla_custom_calls.cc")]
    for march in others:
        build.build(str(tmp_path / f"{march}.so"), march=march, sources=vector_code)
        assert (tmp_path / f"{march}.so").stat().st_size > 0


# Widths cover every column tail of AVX-512's 64-wide register blocks (16, 32, 48); the
# expert row counts every row tail of the 6-row blocks, an expert without rows, and experts
# whose rows' transposition (16 x 16 or 8 x 8 blocks, then single rows) has whole blocks and
# a tail; the last expert's weight gradients sum two chunks of rows (kChunkRows = 512), the
# first of them in two passes over the columns (ColumnsPerPass: 64 at 512 rows), and
# d_in = 1024 gives the hidden layer, bias included, two passes (32 + 16 columns).
@pytest.mark.parametrize("d_in, hidden, d_out",
                         [(16, 48, 80), (32, 64, 16), (48, 112, 96), (64, 32, 64),
                          (1024, 48, 16)])
@pytest.mark.parametrize("keep_hidden", [True, False])
def test_ops_match_numpy(d_in, hidden, d_out, keep_hidden):
    expert_row_counts = [1, 2, 3, 4, 5, 0, 6, 7, 13, 16, 37, 600]
    rows, d_outputs, weights = random_problem(expert_row_counts, d_in, hidden, d_out)
    x, dy = tf.constant(rows, tf.float32), tf.constant(d_outputs, tf.float32)
    w = [tf.constant(v, tf.float32) for v in weights]
    sizes = tf.constant(expert_row_counts, tf.int32)

    outputs, act = ops().moe_grouped_feed_forward(x, sizes, *w, keep_hidden=keep_hidden)
    assert act.shape == ((x.shape[0], hidden) if keep_hidden else (0, hidden))

    @tf.function
    def gradients(dy):
        # dy / 2 is read by nothing else, so with d_in = d_out the op may write its input
        # gradients into that buffer; both cases must give the same numbers.
        return ops().moe_grouped_feed_forward_grad(x, sizes, w[0], w[1], w[2], act, dy / 2)

    grads = gradients(2 * dy)

    want_y, want_grads = ref.sorted_rows_ffn_and_gradients(rows, expert_row_counts,
                                                           d_outputs, *weights)
    np.testing.assert_allclose(outputs.numpy(), want_y, rtol=1e-4, atol=1e-4)
    if keep_hidden:
        begin = np.cumsum([0] + expert_row_counts)
        want_act = np.zeros((x.shape[0], hidden))
        for e in range(len(expert_row_counts)):
            block = slice(begin[e], begin[e + 1])
            want_act[block] = np.maximum(rows[block] @ weights[0][e] + weights[1][e], 0)
        np.testing.assert_allclose(act.numpy(), want_act, rtol=1e-4, atol=1e-4)
    names = ["d_inputs", "d_kernel_in", "d_bias_in", "d_kernel_out", "d_bias_out"]
    for got, want, name in zip(grads, want_grads, names):
        # float32 sums over up to 600 rows: rounding grows with the gradient's scale.
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4,
                                   atol=1e-5 * max(10.0, np.abs(want).max()), err_msg=name)


@pytest.mark.parametrize("keep_hidden", [True, False])
def test_ops_under_xla_match_numpy(keep_hidden):
    """Inside a compiled function the ops are XLA custom calls (on XLA's threads): the
    same numbers, an empty hidden recomputed, the padding rows zero."""
    expert_row_counts = [1, 0, 7, 13, 37, 600]
    rows, d_outputs, weights = random_problem(expert_row_counts, 48, 112, 96)
    x, dy = tf.constant(rows, tf.float32), tf.constant(d_outputs, tf.float32)
    w = [tf.constant(v, tf.float32) for v in weights]
    sizes = tf.constant(expert_row_counts, tf.int32)

    @tf.function(jit_compile=True)
    def forward_and_gradients(x, dy):
        outputs, act = ops().moe_grouped_feed_forward(x, sizes, *w, keep_hidden=keep_hidden)
        return outputs, act, ops().moe_grouped_feed_forward_grad(x, sizes, *w[:3], act, dy)

    hlo = forward_and_gradients.experimental_get_compiler_ir(x, dy)(stage="hlo")
    for target in ("moe_grouped_feed_forward", "moe_grouped_feed_forward_grad"):
        assert f'custom_call_target="{target}"' in hlo
    outputs, act, grads = forward_and_gradients(x, dy)
    assert act.shape == ((x.shape[0], 112) if keep_hidden else (0, 112))
    want_y, want_grads = ref.sorted_rows_ffn_and_gradients(rows, expert_row_counts,
                                                           d_outputs, *weights)
    np.testing.assert_allclose(outputs.numpy(), want_y, rtol=1e-4, atol=1e-4)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-4,
                                   atol=1e-5 * max(10.0, np.abs(want).max()))


@pytest.mark.parametrize("recompute", [False, True])
def test_experts_on_sorted_rows_train_with_the_kernels(recompute):
    """FeedForwardExperts takes the compiled path in training calls only, and its
    outputs and gradients match NumPy's."""
    expert_row_counts = [5, 0, 9, 2]
    rows, d_outputs, _ = random_problem(expert_row_counts, 16, 32, 16, seed=1)
    layer = FeedForwardExperts(num_experts=4, hidden_size=32, output_size=16,
                               recompute_activations=recompute)
    layer.build((None, 16))
    rng = np.random.default_rng(2)
    for weight in layer.weights:
        weight.assign(rng.normal(size=weight.shape))
    sizes = tf.constant(expert_row_counts, tf.int32)
    x = tf.constant(rows, tf.float32)

    @tf.function
    def step(x, training):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, expert_row_counts=sizes, training=training)
            loss = tf.reduce_sum(y * tf.constant(d_outputs, tf.float32))
        return y, tape.gradient(loss, [x] + layer.weights)

    assert {"MoeGroupedFeedForward", "MoeGroupedFeedForwardGrad"} <= op_types(
        step.get_concrete_function(x, True))
    assert not any(t.startswith("Moe") for t in op_types(step.get_concrete_function(x, False)))

    want_y, want_grads = ref.sorted_rows_ffn_and_gradients(
        rows, expert_row_counts, d_outputs,
        *(w.numpy().astype(np.float64) for w in layer.weights))
    for training in (True, False):
        y, grads = step(x, training)
        np.testing.assert_allclose(y.numpy(), want_y, rtol=1e-4, atol=1e-4)
        for got, want in zip(grads, want_grads):
            np.testing.assert_allclose(got.numpy(), want, rtol=1e-4, atol=1e-4)


def test_kernels_are_skipped_where_they_do_not_apply(monkeypatch):
    """Widths that are not multiples of 16, other dtypes, many rows per expert and a
    visible GPU stay on TensorFlow ops (and still train)."""
    def has_kernel_op(layer, rows, dtype=tf.float32):
        layer.build((None, rows.shape[-1]))
        sizes = tf.constant([rows.shape[0] // 2, rows.shape[0] - rows.shape[0] // 2])

        @tf.function
        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                loss = tf.reduce_sum(layer(x, expert_row_counts=sizes, training=True))
            return tape.gradient(loss, [x] + layer.weights)

        graph = step.get_concrete_function(tf.cast(rows, dtype)).graph
        return any(op.type.startswith("Moe") for op in graph.get_operations())

    def experts(**kwargs):
        return FeedForwardExperts(num_experts=2, hidden_size=32, output_size=16, **kwargs)

    assert has_kernel_op(experts(), np.ones((20, 16)))
    assert not has_kernel_op(experts(compiled_kernels=False), np.ones((20, 16)))
    assert not has_kernel_op(experts(), np.ones((20, 12)))           # d_in % 16
    assert has_kernel_op(experts(), np.ones((4096, 16)))             # 2048 rows per expert
    assert not has_kernel_op(experts(), np.ones((4098, 16)))         # 2049
    assert not has_kernel_op(experts(dtype="mixed_bfloat16"), np.ones((20, 16)),
                             tf.bfloat16)
    pretend_a_gpu_is_visible(monkeypatch)
    assert not has_kernel_op(experts(), np.ones((20, 16)))


@pytest.mark.parametrize("change, message", [
    # The op's messages name its input as the C++ op does: group_sizes.
    (dict(expert_row_counts=[4, 5]), "group_sizes sum to 9, more than the 8 rows"),
    (dict(expert_row_counts=[-1, 2]), r"group_sizes\[0\] = -1 is negative"),
    (dict(d_in=12), "multiples of 16"),
    (dict(kernel_in_experts=3), r"kernel_in must be \[experts, d, h\]"),
])
@pytest.mark.parametrize("jit_compile", [False, True])
def test_bad_operands_are_named(change, message, jit_compile):
    """In TensorFlow's kernel, and under XLA: the shapes when compiling, the group sizes
    in the custom call."""
    d_in = change.get("d_in", 16)
    x = tf.ones([8, d_in])
    sizes = tf.constant(change.get("expert_row_counts", [3, 4]), tf.int32)
    kernel_in = tf.ones([change.get("kernel_in_experts", 2), d_in, 32])
    run = tf.function(ops().moe_grouped_feed_forward, jit_compile=True) if jit_compile \
        else ops().moe_grouped_feed_forward
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        run(x, sizes, kernel_in, tf.ones([2, 32]), tf.ones([2, 32, 16]), tf.ones([2, 16]))


@pytest.mark.parametrize("recompute", [False, True])
def test_unknown_row_count_chooses_the_path_at_run_time(recompute):
    """With the rows unknown when tracing, a tf.cond picks the kernels or the TensorFlow
    loop from the rows per expert; both must give NumPy's numbers."""
    layer = FeedForwardExperts(num_experts=2, hidden_size=32, output_size=16,
                               recompute_activations=recompute)
    layer.build((None, 16))
    rng = np.random.default_rng(3)
    for weight in layer.weights:
        weight.assign(rng.normal(size=weight.shape) * 0.3)

    @tf.function(input_signature=[tf.TensorSpec([None, 16]), tf.TensorSpec([2], tf.int32),
                                  tf.TensorSpec([None, 16])])
    def step(x, sizes, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer(x, expert_row_counts=sizes, training=True) * dy)
        return loss, tape.gradient(loss, [x] + layer.weights)

    types = op_types(step.get_concrete_function())
    assert {"MoeGroupedFeedForward", "If"} <= types or {"MoeGroupedFeedForward",
                                                       "StatelessIf"} <= types

    # The kernels, then past 2048 rows per expert.
    for expert_row_counts in ([3, 4], [2100, 2000]):
        rows, d_outputs = (rng.normal(size=(sum(expert_row_counts), w)) for w in (16, 16))
        _, grads = step(tf.constant(rows, tf.float32), tf.constant(expert_row_counts),
                        tf.constant(d_outputs, tf.float32))
        _, want = ref.sorted_rows_ffn_and_gradients(
            rows, expert_row_counts, d_outputs,
            *(w.numpy().astype(np.float64) for w in layer.weights))
        for got, expected in zip(grads, want):
            np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4,
                                       atol=1e-5 * max(10.0, np.abs(expected).max()))


def weighted_row_sum_problem(counts, d, seed=0):
    """Rows `[sum(counts), d]`, a permutation of them, weights and per-sum offsets."""
    rng = np.random.default_rng(seed)
    entries = sum(counts)
    return (rng.normal(size=(entries, d)), rng.permutation(entries).astype(np.int32),
            rng.normal(size=entries), np.concatenate([[0], np.cumsum(counts)]).astype(np.int32))


# d = 37 has both 16-lane blocks and a scalar tail; one sum has no entries.
@pytest.mark.parametrize("d", [5, 16, 37])
@pytest.mark.parametrize("weighted", [True, False])
def test_weighted_row_sum_ops_match_numpy(d, weighted):
    counts = [2, 0, 1, 4, 2, 3]
    rows, row_index, weights, offsets = weighted_row_sum_problem(counts, d)
    if not weighted:
        weights = np.ones_like(weights)
    d_sums = np.random.default_rng(1).normal(size=(len(counts), d))
    sums = ops().moe_weighted_row_sum(
        tf.constant(rows, tf.float32), row_index,
        tf.constant(weights if weighted else np.zeros(0), tf.float32), offsets)

    want_sums = np.zeros((len(counts), d))
    want_d_rows, want_d_weights = np.zeros_like(rows), np.zeros_like(weights)
    for n in range(len(counts)):
        for a in range(offsets[n], offsets[n + 1]):
            r = row_index[a]
            want_sums[n] += weights[a] * rows[r]
            want_d_rows[r] = weights[a] * d_sums[n]
            want_d_weights[a] = d_sums[n] @ rows[r]
    np.testing.assert_allclose(sums.numpy(), want_sums, rtol=1e-5, atol=1e-5)

    d_rows, d_weights = ops().moe_weighted_row_sum_grad(
        tf.constant(rows, tf.float32), row_index, tf.constant(weights, tf.float32), offsets,
        tf.constant(d_sums, tf.float32))
    np.testing.assert_allclose(d_rows.numpy(), want_d_rows, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(d_weights.numpy(), want_d_weights, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("change, message", [
    (dict(row_index=[0, 1, 2, 7]), r"row_index\[3\] = 7 is not in \[0, 4\)"),
    (dict(offsets=[0, 3, 2, 4]), r"offsets must not decrease"),
    (dict(offsets=[0, 1, 2, 3]), "offsets must run from 0 to the 4 entries"),
    (dict(weights=[1.0, 2.0]), r"weights must be \[entries\] = \[4\] or empty"),
    (dict(row_index=[0, 1, 1, 3], grad=True), "row 1 appears twice"),
    (dict(weights=[], grad=True), r"weights must be \[entries\] = \[4\], got shape \[0\]"),
])
def test_weighted_row_sum_bad_operands_are_named(change, message):
    rows = tf.ones([4, 3])
    row_index = tf.constant(change.get("row_index", [3, 0, 2, 1]), tf.int32)
    weights = tf.constant(change.get("weights", [1.0, 2.0, 3.0, 4.0]), tf.float32)
    offsets = tf.constant(change.get("offsets", [0, 2, 2, 4]), tf.int32)
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        if change.get("grad"):
            ops().moe_weighted_row_sum_grad(rows, row_index, weights, offsets, tf.ones([3, 3]))
        else:
            ops().moe_weighted_row_sum(rows, row_index, weights, offsets)


def layer_op_types(layer, x, training):
    """The op types of a traced training step of `layer` (gradients included)."""
    @tf.function
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(tf.sin(layer(x, training=training)))
        return tape.gradient(loss, [x] + layer.trainable_weights)

    return op_types(step.get_concrete_function(x))


@pytest.mark.parametrize("gating", ["top_k", "balanced"])
def test_sparse_dispatch_sums_train_with_the_kernels(gating, monkeypatch):
    """The layer's training step takes the per-token sum ops (slot and dense routings,
    and widths the experts' kernels do not take), and its outputs and gradients equal
    those of the TensorFlow-only layer, masked tokens included; inference,
    compiled_kernels=False and a visible GPU do not take them."""
    def layer(**kwargs):
        noise = {"noisy_gating": False} if gating == "top_k" else {}  # balanced has none
        moe = SparselyGatedMoE(6, 2, 8, gating=gating, **noise, **kwargs)
        moe.build((None, 5))
        rng = np.random.default_rng(4)
        for weight in moe.weights:
            weight.assign(rng.normal(size=weight.shape))
        return moe

    x = tf.constant(np.random.default_rng(5).normal(size=(23, 5)), tf.float32)
    mask = tf.constant(np.arange(23) % 5 != 3)  # masked tokens have no assignments
    compiled, plain = layer(), layer(compiled_kernels=False)
    sum_ops = {"MoeWeightedRowSum", "MoeWeightedRowSumGrad"}
    assert sum_ops <= layer_op_types(compiled, x, True)
    assert not sum_ops & layer_op_types(compiled, x, False)
    assert not sum_ops & layer_op_types(plain, x, True)
    with monkeypatch.context() as patch:
        pretend_a_gpu_is_visible(patch)
        assert not sum_ops & layer_op_types(layer(), x, True)

    results = []
    for moe in (compiled, plain):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = moe(x, training=True, mask=mask)
            loss = tf.reduce_sum(tf.sin(y) * tf.range(5, dtype=tf.float32))
        results.append([y, *tape.gradient(loss, [x] + moe.trainable_weights)])
    for got, want in zip(*results):
        if want is None:  # the balanced gate's threshold is not trained by gradients
            assert got is None
            continue
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)


def capacity_layer(**kwargs):
    """A capacity-dispatch layer whose experts the kernels take (widths of 16 and 32),
    with weights large enough for the routing to matter and drops at F = 1."""
    moe = SparselyGatedMoE(4, 2, 32, dispatch="capacity", capacity_factor=1.0,
                           noisy_gating=False, **kwargs)
    moe.build((None, 16))
    rng = np.random.default_rng(6)
    for weight in moe.weights:
        weight.assign(rng.normal(size=weight.shape) * 0.5)
    return moe


@pytest.mark.parametrize("group_size", [None, 8])
def test_capacity_dispatch_under_xla_runs_the_kernels(group_size):
    """Compiled with XLA, the capacity path's training step runs its experts as the
    kernels' custom calls, with the outputs and gradients of the uncompiled step (which
    runs the same kernels as TensorFlow ops); inference calls and compiled_kernels=False
    compile to XLA's batched dots instead, with the same numbers."""
    x = tf.constant(np.random.default_rng(7).normal(size=(21, 16)), tf.float32)

    def step_of(layer, training):
        def step(x):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=training)
                loss = tf.reduce_sum(tf.sin(y) * tf.range(16, dtype=tf.float32))
            return [y, *tape.gradient(loss, [x] + layer.experts.trainable_weights)]
        return step

    def custom_calls(step):
        hlo = tf.function(step, jit_compile=True).experimental_get_compiler_ir(x)(
            stage="hlo")
        return {target for target in ("moe_grouped_feed_forward",
                                      "moe_grouped_feed_forward_grad")
                if f'custom_call_target="{target}"' in hlo}

    layer = capacity_layer(capacity_group_size=group_size)
    plain = capacity_layer(capacity_group_size=group_size, compiled_kernels=False)
    assert custom_calls(step_of(layer, True)) == {"moe_grouped_feed_forward",
                                                  "moe_grouped_feed_forward_grad"}
    assert custom_calls(step_of(layer, False)) == set()
    assert custom_calls(step_of(plain, True)) == set()

    want = step_of(layer, True)(x)
    assert float(layer.balance_statistics()["dropped_fraction"]) > 0
    for layer_and_mode in ((layer, True), (layer, False), (plain, True)):
        got = tf.function(step_of(*layer_and_mode), jit_compile=True)(x)
        for g, w in zip(got, want):
            # float32 sums in other orders: rounding grows with the values' scale.
            np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-4,
                                       atol=1e-5 * max(1.0, np.abs(w.numpy()).max()))
