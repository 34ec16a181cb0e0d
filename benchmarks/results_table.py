"""What the results tables (`lm_table`, `router_table`) share: their training runs and the
files they write.

A table's row is one `python -m train.lm` subprocess in a run directory of its own, whose
metrics.json says when it is complete; `train_runs` trains a list of them in order, N at a
time, each on its own share of the CPUs, skipping complete runs and resuming partial ones
from their checkpoints. A table's outputs are written whole or not at all: its JSON, its
plot, and its block between two markers in a Markdown file whose rest is kept.
"""

import argparse
import concurrent.futures
import json
import os
import queue
import subprocess
import sys
import time
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402  (after the backend is chosen)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The keys of `train.lm`'s metrics.json that a table reads; a file without them is of an
# unfinished or older run.
METRIC_KEYS = ("global_step", "valid_perplexity", "test_perplexity", "tokens_per_second",
               "ops_per_timestep", "params_excluding_embedding_softmax", "final_train_loss")


class TrainingRun(NamedTuple):
    """One row's run: its progress lines' label, its directory and `train.lm`'s flags."""

    label: str
    model_dir: str
    flags: List[str]


# ------------------------------------------------------------------------------ runs

def read_metrics(model_dir: str, train_steps: int) -> Optional[Dict]:
    """The run's metrics.json if it is complete for `train_steps`, else None."""
    path = os.path.join(model_dir, "metrics.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        metrics = json.load(f)
    if any(key not in metrics for key in METRIC_KEYS) or metrics["global_step"] < train_steps:
        return None
    return metrics


def run_training(run: TrainingRun, train_steps: int, *,
                 cpus: Optional[Sequence[int]] = None) -> bool:
    """Runs `python -m train.lm` with the run's flags in a subprocess, its output appended
    to model_dir/train.log, unless model_dir holds a run complete for `train_steps` (a
    rerun resumes a partial one from its checkpoint); True if the run is complete.

    With `cpus`, the calling thread is pinned to them, and so is the subprocess it starts
    (Linux gives a child its parent thread's CPU mask), with as many intra-op threads."""
    if read_metrics(run.model_dir, train_steps) is not None:
        print(f"{run.label}: complete, skipped", flush=True)
        return True
    os.makedirs(run.model_dir, exist_ok=True)
    command = [sys.executable, "-m", "train.lm", *run.flags]
    env = None
    where = ""
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
        env = dict(os.environ, TF_NUM_INTRAOP_THREADS=str(len(cpus)))
        where = f" on CPUs {','.join(map(str, cpus))}"
    print(f"{run.label}: training{where}; log {run.model_dir}/train.log", flush=True)
    start = time.time()
    with open(os.path.join(run.model_dir, "train.log"), "a", encoding="utf-8") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        # The subprocess imports train/ and models/ from this tree, not from elsewhere.
        returncode = subprocess.run(command, cwd=REPO_ROOT, stdout=log, env=env,
                                    stderr=subprocess.STDOUT, check=False).returncode
    done = returncode == 0 and read_metrics(run.model_dir, train_steps) is not None
    print(f"{run.label}: {'done' if done else f'FAILED ({returncode})'} in "
          f"{(time.time() - start) / 60:.1f} min", flush=True)
    return done


def cpu_slots(cpus: Sequence[int], parallel_runs: int) -> List[List[int]]:
    """`cpus` cut into `parallel_runs` contiguous slots, as even as they go:
    [0, 1, 2, 3, 4], 2 -> [[0, 1, 2], [3, 4]]."""
    if not 1 <= parallel_runs <= len(cpus):
        raise ValueError(f"cannot cut {len(cpus)} CPUs into {parallel_runs} slots")
    size, extra = divmod(len(cpus), parallel_runs)
    bounds = [slot * size + min(slot, extra) for slot in range(parallel_runs + 1)]
    return [list(cpus[begin:end]) for begin, end in zip(bounds, bounds[1:])]


def run_on_free_cpus(run: TrainingRun, train_steps: int, *,
                     slots: "queue.Queue[List[int]]") -> bool:
    """`run_training` on a slot of CPUs taken from `slots` and given back after."""
    cpus = slots.get()
    try:
        return run_training(run, train_steps, cpus=cpus)
    finally:
        slots.put(cpus)


def train_runs(runs: Sequence[TrainingRun], train_steps: int, *, parallel_runs: int,
               after_each: Callable[[], None]) -> List[TrainingRun]:
    """Trains `runs`, started in their order, `parallel_runs` at a time, each on its own
    slot of this process's CPUs; calls `after_each` in this thread whenever one ends (so
    that only this thread writes the table). Returns the runs that did not complete.

    On 2 cores two 1-core runs do 1.36x the work of one 2-core run (benchmarks/RESULTS.md,
    "Two table runs at a time"): one time step's matmuls do not keep two threads busy."""
    slots = queue.Queue()
    for cpus in cpu_slots(sorted(os.sched_getaffinity(0)), parallel_runs):
        slots.put(cpus)
    failed = []
    with concurrent.futures.ThreadPoolExecutor(parallel_runs) as pool:
        futures = {pool.submit(run_on_free_cpus, run, train_steps, slots=slots): run
                   for run in runs}
        for future in concurrent.futures.as_completed(futures):
            if not future.result():
                failed.append(futures[future])
            after_each()
    return failed


def train_and_write_table(name: str, runs: Sequence[TrainingRun], train_steps: int, *,
                          parallel_runs: int, write_outputs: Callable[[], None],
                          results: str) -> int:
    """A table's main loop: `train_runs`, the outputs rewritten after every run (once
    when there is none to train), then where the results are and which runs failed.
    Returns the exit status: 1 if a run failed (a rerun resumes it), else 0."""
    failed = train_runs(runs, train_steps, parallel_runs=parallel_runs,
                        after_each=write_outputs)
    if not runs:
        write_outputs()
    print(f"[{name}] results: {results}", flush=True)
    if failed:
        print(f"[{name}] failed: "
              f"{', '.join(os.path.basename(run.model_dir) for run in failed)} "
              "(rerun to resume them)", flush=True)
        return 1
    return 0


def add_parallel_runs_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--parallel_runs", type=int, default=1,
                        help="Runs trained at a time, each on its own share of the CPUs.")


def check_parallel_runs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    cpus = len(os.sched_getaffinity(0))
    if not 1 <= args.parallel_runs <= cpus:
        parser.error(f"--parallel_runs must be between 1 and the {cpus} CPUs this process "
                     f"may use; got {args.parallel_runs}")


# ----------------------------------------------------------------------------- files

def write_text_atomically(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def new_figure(width: float, height: float):
    """A (figure, axes) pair `width` x `height` inches for `save_figure`; the tables draw
    with matplotlib through this module only, which selects the file-only backend."""
    return plt.subplots(figsize=(width, height))


def save_figure(figure, path: str) -> None:
    """Writes `figure` as a PNG to `path` (whole or not at all) and closes it."""
    figure.tight_layout()
    figure.savefig(path + ".tmp.png", dpi=120)
    plt.close(figure)
    os.replace(path + ".tmp.png", path)


def replace_block(document: str, block: str, markers: Tuple[str, str]) -> str:
    """`document` with the block between `markers` replaced by `block` (which starts and
    ends with them; appended when the document has none)."""
    begin, end = document.find(markers[0]), document.find(markers[1])
    if begin == -1 or end < begin:
        separator = "" if not document or document.endswith("\n\n") else (
            "\n" if document.endswith("\n") else "\n\n")
        return document + separator + block + "\n"
    return document[:begin] + block + document[end + len(markers[1]):]


def update_markdown(path: str, block: str, markers: Tuple[str, str]) -> None:
    document = ""
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            document = f.read()
    write_text_atomically(path, replace_block(document, block, markers))


def format_number(value: Optional[float], digits: int = 2) -> str:
    """A table cell: "-" for a missing value, else thousands separated."""
    return "-" if value is None else f"{value:,.{digits}f}"
