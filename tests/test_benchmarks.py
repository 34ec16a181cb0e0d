"""The benchmarks' command lines and report arithmetic (no benchmark is run here)."""

import dataclasses

import pytest

from benchmarks import layer_bench, memory_bench, profile_layer, serving_bench


def result(num_experts, times, dense_times, dispatch="sparse"):
    """A worker result as `layer_bench.measure` returns it."""
    config = layer_bench.Config(num_experts=num_experts, dispatch=dispatch, steps=len(times))
    return {"config": dataclasses.asdict(config), "peak_rss": 3 * 2 ** 30,
            "times": times, "dense_times": dense_times,
            "cpu_times": [2 * t for t in times], "dense_cpu_times": dense_times}


def test_ratio_line_divides_the_medians_per_dispatch_path():
    results = [result(None, [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]),
               result(8, [0.2, 0.3, 0.9], [0.2, 0.25, 0.1]),
               result(8, [5.0, 5.0, 5.0], [1.0, 1.0, 1.0], dispatch="capacity"),
               result(512, [0.6, 0.5, 0.4], [0.25, 0.2, 0.3])]
    assert layer_bench.ratio_line(results, "sparse") == "ratio_vs_dense E8=1.50 E512=2.00"
    assert layer_bench.ratio_line(results, "capacity") == "ratio_vs_dense E8=5.00"


def test_capacity_ratio_line_also_divides_by_the_capacity_factor():
    capacity = result(8, [5.0, 5.0, 5.0], [2.0, 2.0, 2.0], dispatch="capacity")
    capacity["capacity_factor"] = 1.25
    assert layer_bench.ratio_line([capacity], "capacity") == (
        "ratio_vs_dense E8=2.50  per_capacity_factor E8=2.00")


def test_a_tiny_capacity_worker_runs_under_xla():
    """A real worker step (the layer and the dense baseline compiled with XLA)."""
    config = layer_bench.Config(num_experts=4, dispatch="capacity", capacity_factor=1.25,
                                jit_compile=True, tokens=64, model_dim=16, hidden_size=16,
                                k=2, steps=2, warmup=1)
    measured = layer_bench.measure(config)
    assert measured["capacity_factor"] == 1.25
    assert len(measured["times"]) == len(measured["dense_times"]) == 2


def test_table_row_reports_throughput_memory_and_both_ratios():
    row = layer_bench._row(result(64, [0.5, 0.4, 0.6], [0.25, 0.16, 0.3]))
    config = layer_bench.Config(num_experts=64)
    assert row[:6] == ["MoE E=64", "sparse", "500", "400", "600", f"{4096 / 0.5:,.0f}"]
    assert row[6] == f"{config.useful_flops / 0.5 / 1e9:.0f}"
    assert row[7:] == ["3.00", "250", "2.00", "2.50", "4.00"]


@pytest.mark.parametrize("main, argv, message", [
    (layer_bench.main, ["--quick", "--experts", "0"], "invalid positive_int value"),
    (layer_bench.main, ["--quick", "--experts", "2"], "at least k = 4 experts"),
    (layer_bench.main, ["--quick", "--tokens", "many"], "invalid positive_int value"),
    (layer_bench.main, ["--quick", "--steps", "-1"], "invalid positive_int value"),
    (layer_bench.main, ["--quick", "--dispatch", "dense"], "invalid choice"),
    (layer_bench.main, ["--quick", "--capacity-group-size", "0"], "invalid positive_int value"),
    (layer_bench.main, ["--quick", "--capacity-factor", "0"], "invalid positive_float value"),
    (layer_bench.main, ["--quick", "--jit-compile"], "needs --dispatch capacity"),
    (layer_bench.main, ["--dispatch", "sparse", "--capacity-factor", "1"],
     "applies to --dispatch capacity only"),
    (profile_layer.main, ["--experts", "8", "--jit-compile"], "needs --dispatch capacity"),
    (memory_bench.main, ["--experts", "100"], "must be a multiple of --groups (64)"),
    (memory_bench.main, ["--experts", "64"], "at least k = 2 experts per group"),
    (memory_bench.main, ["--groups", "1"], "at least group_k = 2"),
    (memory_bench.main, ["--optimizers", "sgd"], "invalid choice"),
    (memory_bench.main, ["--steps", "0"], "invalid positive_int value"),
])
def test_benchmarks_reject_bad_arguments_by_name(main, argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("jit_compile", [False, True])
def test_profile_layer_times_the_steps_ops(jit_compile, capsys):
    """Op types and their time per step; under XLA the compiled program's instructions
    (its dots named after the TensorFlow MatMuls they came from), not the program's call."""
    profile_layer.main(["--experts", "4", "--dispatch", "capacity", "--capacity-factor", "1",
                        "--tokens", "64", "--steps", "1"]
                       + ["--jit-compile"] * jit_compile)
    table = capsys.readouterr().out.split("| op type |")[1].split("\n\n")[0]
    times = {row.split(" | ")[0].strip("| "): float(row.split(" | ")[1])
             for row in table.splitlines()[2:]}
    assert times and all(ms >= 0 for ms in times.values())
    if jit_compile:
        assert "MatMul" in times and times["MatMul"] > 0
    assert not [op for op in times if op.startswith("__inference")]


def test_layer_bench_can_turn_the_compiled_kernels_off():
    # The default is the layer's: "auto", the kernels where they apply.
    assert layer_bench._parse_args(["--quick"]).compiled_kernels == "auto"
    assert layer_bench._parse_args(["--quick", "--no-compiled-kernels"]).compiled_kernels is False
    assert layer_bench.Config().compiled_kernels == "auto"


def test_layer_bench_allocator_flag_sets_the_worker_environment(monkeypatch, capsys):
    assert layer_bench._parse_args(["--quick"]).allocator == "tensorflow"
    assert layer_bench.allocator_environment("tensorflow") == {}
    assert layer_bench.allocator_environment("unpooled") == {
        "TF_CPU_ALLOCATOR_USE_BFC": "false", "TF_ONEDNN_USE_SYSTEM_ALLOCATOR": "1"}
    monkeypatch.setattr(layer_bench.ctypes.util, "find_library", lambda name: None)
    with pytest.raises(SystemExit) as exit_info:
        layer_bench.main(["--quick", "--allocator", "tcmalloc"])
    assert exit_info.value.code == 2
    assert "no tcmalloc library found" in capsys.readouterr().err


@pytest.mark.parametrize("allocator", [
    "unpooled",
    pytest.param("tcmalloc", marks=pytest.mark.skipif(
        layer_bench.ctypes.util.find_library("tcmalloc_minimal") is None,
        reason="tcmalloc is not installed (apt-get install libtcmalloc-minimal4)"))])
def test_layer_bench_worker_runs_with_the_allocator_asked_for(allocator):
    """A tiny configuration in a real worker process: the allocator asked for must be the
    one in use (the worker refuses to run otherwise), and the step must be timed."""
    config = layer_bench.Config(num_experts=4, tokens=32, model_dim=16, hidden_size=16,
                                steps=2, warmup=1, allocator=allocator)
    result = layer_bench.run_worker("benchmarks.layer_bench", dataclasses.asdict(config))
    assert result["config"]["allocator"] == allocator
    assert len(result["times"]) == 2 and result["peak_rss"] > 0


def test_quantized_experts_bench_times_every_storage():
    from benchmarks import quantized_experts_bench

    ms = quantized_experts_bench.measure(3, 2, num_experts=4, k=2, hidden_size=8,
                                         model_dim=4)
    assert set(ms) == {*quantized_experts_bench.STORAGES, "float32, sorted rows"}
    assert all(value > 0 for value in ms.values())


def test_serving_bench_prompts_run_on_into_the_next_sentences():
    sentences = [b"a b c", b"d e", b"f g h i"]
    assert serving_bench.prompts_of_words(sentences, 4) == [b"a b c d", b"d e f g",
                                                            b"f g h i"]
    assert serving_bench.prompts_of_words(sentences, 1) == [b"a", b"d", b"f"]
