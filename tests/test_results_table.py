"""benchmarks.results_table: the CPU slots of parallel runs, their scheduling, and the
Markdown block a table rewrites."""

import os
import sys
import threading

import pytest

from benchmarks import lm_table, results_table, router_table

MARKERS = ("<!-- t:begin -->", "<!-- t:end -->")


@pytest.mark.parametrize("document,expected", [
    ("# R\n\nbefore\n<!-- t:begin -->\nold\n<!-- t:end -->\nafter\n",
     "# R\n\nbefore\n<!-- t:begin -->\nnew\n<!-- t:end -->\nafter\n"),
    ("# R\n", "# R\n\n<!-- t:begin -->\nnew\n<!-- t:end -->\n"),
    ("", "<!-- t:begin -->\nnew\n<!-- t:end -->\n"),
])
def test_markdown_block_replaced_or_appended(document, expected):
    block = f"{MARKERS[0]}\nnew\n{MARKERS[1]}"
    assert results_table.replace_block(document, block, MARKERS) == expected


def test_cpu_slots_are_disjoint_and_as_even_as_they_go():
    assert results_table.cpu_slots([0, 1], 2) == [[0], [1]]
    assert results_table.cpu_slots([0, 1], 1) == [[0, 1]]
    assert results_table.cpu_slots([0, 1, 2, 3, 4], 2) == [[0, 1, 2], [3, 4]]
    assert results_table.cpu_slots([3, 5, 8, 9], 3) == [[3, 5], [8], [9]]
    with pytest.raises(ValueError, match="cannot cut 2 CPUs into 3 slots"):
        results_table.cpu_slots([0, 1], 3)


@pytest.mark.parametrize("parse_args", [lm_table.parse_args, router_table.parse_args])
def test_parallel_runs_beyond_the_cpus_are_refused(parse_args, capsys):
    cpus = len(os.sched_getaffinity(0))
    for bad in (0, cpus + 1):
        with pytest.raises(SystemExit):
            parse_args([f"--parallel_runs={bad}"])
        assert (f"--parallel_runs must be between 1 and the {cpus} CPUs this process may "
                f"use; got {bad}") in capsys.readouterr().err


def test_train_runs_go_in_order_on_disjoint_cpus(monkeypatch):
    """Every run starts in the given order on a slot no other running run holds; the
    table is rewritten after each, from the calling thread; failures are returned."""
    cpus = sorted(os.sched_getaffinity(0))
    parallel_runs = min(2, len(cpus))
    started, busy, after = [], set(), []
    lock = threading.Lock()

    def fake_run_training(run, train_steps, *, cpus):
        with lock:
            assert not busy & set(cpus), "two runs on one CPU"
            busy.update(cpus)
            started.append(run.label)
        threading.Event().wait(0.05)
        with lock:
            busy.difference_update(cpus)
        return run.label != "b"

    monkeypatch.setattr(results_table, "run_training", fake_run_training)
    runs = [results_table.TrainingRun(label, f"/x/{label}", []) for label in "abcde"]
    main_thread = threading.current_thread()
    failed = results_table.train_runs(
        runs, 3, parallel_runs=parallel_runs,
        after_each=lambda: after.append(threading.current_thread() is main_thread))
    assert failed == [runs[1]]
    assert sorted(started) == list("abcde")
    # The first runs start first (the workers' own order among them may vary).
    assert sorted(started[:parallel_runs]) == list("abcde")[:parallel_runs]
    assert after == [True] * 5


def test_run_training_pins_the_subprocess(tmp_path, monkeypatch):
    """The subprocess runs on the given CPUs with as many intra-op threads; the calling
    thread (a worker of `train_runs`) keeps that mask."""
    seen = {}

    def fake_run(command, *, env, **kwargs):
        seen.update(affinity=os.sched_getaffinity(0), threads=env["TF_NUM_INTRAOP_THREADS"],
                    command=command)

        class Finished:
            returncode = 1
        return Finished()

    monkeypatch.setattr(results_table.subprocess, "run", fake_run)
    cpu = sorted(os.sched_getaffinity(0))[-1]
    run = results_table.TrainingRun("[t] row", str(tmp_path / "row"), ["--train_steps=3"])
    result = {}
    worker = threading.Thread(target=lambda: result.update(
        done=results_table.run_training(run, 3, cpus=[cpu])))
    worker.start()
    worker.join()
    assert result["done"] is False  # no metrics.json: not complete
    assert seen["affinity"] == {cpu} and seen["threads"] == "1"
    assert seen["command"] == [sys.executable, "-m", "train.lm", "--train_steps=3"]
    assert os.sched_getaffinity(0) != {cpu} or len(os.sched_getaffinity(0)) == 1
