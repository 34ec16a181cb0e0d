"""The custom training loop every binary shares.

tf.function steps, `tf.train.CheckpointManager` checkpoints (model, optimizer, data
iterator), TensorBoard summaries, a progress line, held-out evaluation and `metrics.json`.
A task supplies the model, the data and `loss_fn(model, batch, training)` returning
`(mean_loss, nll_sum, num_tokens)`; the placement's training step adds the layers'
auxiliary losses (`model.losses`), once, to the loss that is differentiated
(`train.distribution.differentiated_loss`, the same under every placement).

Faults: a step whose loss or gradients are not finite changes nothing (the placement
skips its update); `nan_policy` then stops the run or goes on to the next batch. SIGTERM
and SIGINT checkpoint the current step and stop. A checkpoint that cannot be written
stops the run with the path and the reason; one that cannot be read is passed over for
the one before it. Each stop is a `RunStopped` with a one-line message.
"""

import contextlib
import dataclasses
import math
import os
import re
import signal
import tempfile
import threading
import time
from typing import Callable, Dict, Optional

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from moe_tf import SparselyGatedMoE
from train import distribution
from train.training.run_config import read_json, write_json_atomically

CHECKPOINT_DIR = "checkpoints"
DATA_CHECKPOINT_DIR = os.path.join(CHECKPOINT_DIR, "data_position")
METRICS_FILE = "metrics.json"


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    model_dir: str
    train_steps: int
    eval_every: int = 0          # 0: evaluate only at the end
    log_every: int = 50
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    max_eval_batches: int = 0    # 0: the whole held-out split
    nan_policy: str = "stop"     # a non-finite step: "stop", or "skip_step" (see NAN_POLICIES)
    max_consecutive_skips: int = 10


NAN_POLICIES = {
    "stop": "stop at the first step whose loss or gradients hold a NaN or an Inf",
    "skip_step": "skip that step's update and go on; stop after --max_consecutive_skips "
                 "such steps in a row",
}
# Held-out splits with fewer real tokens than this get a warning with their perplexity.
MIN_EVAL_TOKENS = 100


def moe_layers(model: keras.Model):
    return [layer for layer in model._flatten_layers() if isinstance(layer, SparselyGatedMoE)]


class Trainer:
    """Trains `model` on `train_data` with `optimizer`, resuming from `model_dir`.

    The model and optimizer must have been created under `placement.scope()`; the
    placement (see `train.distribution`) puts them on devices and provides the steps. The
    data are global batches, the same under every placement.
    """

    def __init__(self, *, model: keras.Model, optimizer: keras.optimizers.Optimizer,
                 loss_fn: Callable, train_data: tf.data.Dataset,
                 eval_data: Dict[str, tf.data.Dataset], config: LoopConfig,
                 final_evaluation: Optional[Callable[[], Dict[str, float]]] = None,
                 placement: Optional[distribution.Placement] = None):
        """`final_evaluation`, if given, runs after training (e.g. BLEU by decoding); its
        scalars go to TensorBoard (eval) and into metrics.json (chief only)."""
        self.model = model
        self.final_evaluation = final_evaluation
        self.optimizer = optimizer
        self.config = config
        self.placement = placement or distribution.make_placement("default")
        self.is_chief = self.placement.is_chief
        # Other workers save their (identical) checkpoints where nobody reads them, in a
        # directory removed when the loop is collected or the process exits.
        self._scratch = (None if self.is_chief
                         else tempfile.TemporaryDirectory(prefix="moe_tf_worker_"))
        self.write_dir = config.model_dir if self.is_chief else self._scratch.name
        # Unless each process holds only its shards of the model: then every process
        # writes its own into the one checkpoint (multi-client DTensor).
        self.model_checkpoint_dir = (config.model_dir if self.placement.shards_checkpoints
                                     else self.write_dir)
        self.placement.place(model, optimizer)
        self.eval_data = {name: self.placement.input(data)
                          for name, data in eval_data.items()}
        self.iterator = iter(self.placement.input(train_data))
        # NLL and token sums of the current logging window, and the last window's mean:
        # checkpointed so that a resumed run reports what an unbroken one would.
        self.window = tf.Variable([0.0, 0.0], dtype=tf.float64, trainable=False)
        self.last_train_loss = tf.Variable(float("nan"), dtype=tf.float64,
                                           trainable=False)
        # Steps whose update was skipped for a non-finite loss or gradient.
        self.skipped_steps = tf.Variable(0, dtype=tf.int64, trainable=False)
        self.consecutive_skips = 0
        # "<moe layer>/<statistic>" of the last logging window (e.g. moe/dropped_fraction).
        self.last_balance: Dict[str, float] = {}
        self._make_checkpoints()
        self.writer = tf.summary.create_file_writer(os.path.join(self.write_dir, "train"))
        self.eval_writer = tf.summary.create_file_writer(
            os.path.join(self.write_dir, "eval"))
        self._train_step = self.placement.train_step(model, optimizer, loss_fn)
        self._eval_step = self.placement.eval_step(model, loss_fn)

    def _make_checkpoints(self):
        """Two checkpoints saved at the same steps: the model's and the data position's.

        The data iterator is kept apart because DTensor cannot save it in one checkpoint
        with DVariables; every placement writes the same pair, so each restores the
        other's.
        """
        # `model.variables` beyond `model.weights` are the random-seed states (dropout,
        # gating noise); tf.train.Checkpoint does not reach them through the model.
        weights = {id(w) for w in self.model.weights}
        seed_states = [v for v in self.model.variables if id(v) not in weights]
        self.checkpoint = tf.train.Checkpoint(
            model=self.model, optimizer=self.optimizer, window=self.window,
            last_train_loss=self.last_train_loss, skipped_steps=self.skipped_steps,
            seed_states=seed_states)
        self.manager = tf.train.CheckpointManager(
            self.checkpoint, os.path.join(self.model_checkpoint_dir, CHECKPOINT_DIR),
            max_to_keep=self.config.keep_checkpoints)
        self.data_checkpoint = tf.train.Checkpoint(data=self.iterator)
        self.data_manager = tf.train.CheckpointManager(
            self.data_checkpoint, os.path.join(self.write_dir, DATA_CHECKPOINT_DIR),
            max_to_keep=self.config.keep_checkpoints)
        self.data_position_saves = True
        self.saved_step = None  # the step of the last checkpoint written or restored

    def save(self, step: int) -> None:
        """Writes the checkpoint of `step`; raises `RunStopped` naming the directory if
        it cannot (the checkpoints already written stay as they were)."""
        try:
            self._save_position(step)
            self.manager.save(checkpoint_number=step)
        except (tf.errors.OpError, OSError) as error:
            self._remove_partial_checkpoint(step)
            raise RunStopped(
                f"Cannot write the checkpoint of step {step} in "
                f"{os.path.dirname(self.manager.directory.rstrip('/'))}: "
                f"{_first_line(error)}. Nothing earlier is lost ({self._kept}); fix the "
                f"directory or free space, then rerun the same command to resume.") \
                from error
        self.saved_step = step

    @property
    def _kept(self) -> str:
        """What a stop keeps, in words: the last checkpoint written or restored."""
        if self.saved_step is None:
            return "no checkpoint was written yet"
        return f"the checkpoint of step {self.saved_step} is kept"

    def _remove_partial_checkpoint(self, step: int) -> None:
        """Removes what a failed save of `step` left (TensorFlow writes a checkpoint in a
        temporary directory, then moves its files into place)."""
        for manager in (self.manager, self.data_manager):
            partial = os.path.join(manager.directory, f"ckpt-{step}_temp")
            try:
                if tf.io.gfile.exists(partial):
                    tf.io.gfile.rmtree(partial)
            except tf.errors.OpError:
                pass  # the error being reported matters more than the leftovers

    def _save_position(self, step: int) -> None:
        # The data position first: a model checkpoint then always has its position.
        if not self.data_position_saves:
            return
        try:
            self.data_manager.save(checkpoint_number=step)
        except tf.errors.FailedPreconditionError:
            # Pipelines that run Python code (e.g. generators) cannot save a position.
            logging.warning("The data pipeline cannot save its position; checkpoints "
                            "keep the model, optimizer and step, and a resumed run "
                            "restarts the data stream.")
            self.data_position_saves = False

    @property
    def step(self) -> int:
        return int(self.optimizer.iterations.numpy())

    def restore(self) -> int:
        """Restores the newest readable checkpoint, if any; returns the step it reached.

        A checkpoint that cannot be read (truncated, corrupt, missing a file) is passed
        over, with a warning, for the one before it; if none can be read the run stops
        rather than start again and write over them.
        """
        directory = os.path.join(self.config.model_dir, CHECKPOINT_DIR)
        failures = []
        for path in _checkpoints_newest_first(directory):
            try:
                self.checkpoint.restore(path).assert_existing_objects_matched()
            # A damaged file surfaces as an OpError, IndexError, ValueError... by where
            # the reader trips over it.
            except Exception as error:  # pylint: disable=broad-except
                failures.append(f"{os.path.basename(path)}: {_first_line(error)}")
                logging.warning("Cannot read the checkpoint %s (%s); trying the one "
                                "before it.", path, _first_line(error))
                continue
            self._restore_position(os.path.basename(path))
            logging.info("Resumed from %s at step %d.", path, self.step)
            self.saved_step = self.step
            return self.step
        if failures:
            raise RunStopped(
                f"No checkpoint in {directory} can be read ({'; '.join(failures)}). "
                f"Move that directory away to train from step 0.")
        return self.step

    def _restore_position(self, checkpoint_name: str) -> None:
        data = os.path.join(self.config.model_dir, DATA_CHECKPOINT_DIR, checkpoint_name)
        if tf.io.gfile.exists(data + ".index"):
            self.data_checkpoint.restore(data).assert_existing_objects_matched()
        else:
            logging.warning("No data position saved with %s: the data stream restarts.",
                            checkpoint_name)

    def evaluate(self, name: str) -> float:
        """Perplexity on a held-out split: exp(total NLL / total predicted tokens)."""
        nll, tokens = 0.0, 0.0
        for batch_number, batch in enumerate(self.eval_data[name]):
            if self.config.max_eval_batches and batch_number >= self.config.max_eval_batches:
                break
            batch_nll, batch_tokens = self._eval_step(batch)
            nll += float(batch_nll)
            tokens += float(batch_tokens)
        perplexity = _perplexity(nll / tokens) if tokens else float("nan")
        with self.eval_writer.as_default(step=self.step):
            tf.summary.scalar(f"{name}_perplexity", perplexity)
        logging.info("step %d  %s perplexity %.2f  (%d tokens)", self.step, name,
                     perplexity, tokens)
        if tokens < MIN_EVAL_TOKENS:
            logging.warning("The %s perplexity is measured on %d tokens only: it says "
                            "little. Give a larger held-out split.", name, tokens)
        return perplexity

    def _log_balance(self):
        """The MoE layers' balance statistics of the logging window, to TensorBoard and
        (the last window's scalars) to `self.last_balance` for metrics.json."""
        for layer in moe_layers(self.model):
            stats = layer.balance_statistics()
            for key, value in stats.items():
                value = self.placement.to_host(value)
                if key == "load_fraction":
                    tf.summary.histogram(f"{layer.name}/load_fraction", value)
                else:
                    tf.summary.scalar(f"{layer.name}/{key}", value)
                    self.last_balance[f"{layer.name}/{key}"] = float(value)
            self.placement.reset_metrics(layer)

    def train(self, extra_metrics: Optional[Dict] = None) -> Dict:
        """Runs to `train_steps`; returns (and writes) the run's metrics.

        SIGTERM or SIGINT (preemption, Ctrl-C) ends the run after the step under way:
        a checkpoint at that step, then `StoppedBySignal`; the same command resumes there.
        """
        with _stop_requests() as stop_requested:
            return self._train(extra_metrics, stop_requested)

    def _train(self, extra_metrics, stop_requested) -> Dict:
        cfg = self.config
        run_start, run_tokens = time.time(), 0.0
        window_start, window_first_step = time.time(), self.restore()
        while self.step < cfg.train_steps:
            if stop_requested:
                self._stop(stop_requested[0])
            nll_sum, num_tokens, nonfinite = self._train_step(next(self.iterator))
            if np.asarray(nonfinite).any():
                self._skip_nonfinite_step(np.asarray(nonfinite))
                continue
            self.consecutive_skips = 0
            self.window.assign_add(tf.cast(tf.stack([nll_sum, num_tokens]), tf.float64))
            run_tokens += float(num_tokens)
            step = self.step
            if step % cfg.log_every == 0 or step == cfg.train_steps:
                self._log_progress(step, window_start, window_first_step)
                window_start, window_first_step = time.time(), step
            if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.train_steps:
                self.evaluate("valid")
            if step % cfg.checkpoint_every == 0 or step == cfg.train_steps:
                self.save(step)
        metrics = dict(extra_metrics or {})
        metrics.update(
            balance=dict(self.last_balance),
            global_step=self.step, final_train_loss=float(self.last_train_loss.numpy()),
            skipped_steps=int(self.skipped_steps.numpy()),
            tokens_per_second=run_tokens / max(time.time() - run_start, 1e-9),
            valid_perplexity=self.evaluate("valid"), test_perplexity=self.evaluate("test"))
        if not run_tokens:  # a finished run rerun (to export again): keep what it measured
            previous = read_json(os.path.join(cfg.model_dir, METRICS_FILE)) or {}
            for key in ("balance", "tokens_per_second"):
                metrics[key] = previous.get(key, metrics[key])
        self.placement.unplace(self.model)
        if self.final_evaluation is not None:
            extra = self.final_evaluation()
            with self.eval_writer.as_default(step=self.step):
                for name, value in extra.items():
                    tf.summary.scalar(name, value)
            metrics.update(extra)
        if self.is_chief:
            write_json_atomically(os.path.join(cfg.model_dir, METRICS_FILE), metrics)
        self.writer.flush()
        self.eval_writer.flush()
        return metrics

    def _skip_nonfinite_step(self, nonfinite: np.ndarray) -> None:
        """After a step whose update was skipped (`nonfinite`: the step's flags):
        stops the run, or counts the step and goes on, as `nan_policy` says."""
        step = self.step + 1
        self.skipped_steps.assign_add(1)
        self.consecutive_skips += 1
        what = _nonfinite_names(nonfinite, self.model.trainable_variables)
        if self.config.nan_policy == "skip_step":
            if self.consecutive_skips < self.config.max_consecutive_skips:
                logging.warning("Step %d: NaN or Inf in %s; its update is skipped (%d in "
                                "a row, %d in all).", step, what, self.consecutive_skips,
                                int(self.skipped_steps.numpy()))
                return
            reason = (f"{self.consecutive_skips} steps in a row had a NaN or an Inf (the "
                      f"last, step {step}, in {what}) (--max_consecutive_skips)")
        else:
            reason = (f"Step {step} has a NaN or an Inf in {what} (--nan_policy=stop); "
                      f"its update was not applied")
        raise RunStopped(f"{reason}. Training stops; {self._kept}. Lower --learning_rate or "
                         f"raise --warmup_steps, or pass --nan_policy=skip_step.")

    def _stop(self, signal_number: int) -> None:
        """Checkpoints the current step (unless it just was) and raises StoppedBySignal."""
        step = self.step
        if self.saved_step != step:
            self.save(step)
        name = signal.Signals(signal_number).name
        logging.warning("Stopped by %s at step %d/%d; the checkpoint of that step is "
                        "written: the same command resumes there.", name, step,
                        self.config.train_steps)
        raise StoppedBySignal(signal_number)

    def _log_progress(self, step, window_start, window_first_step):
        """Progress line and TensorBoard scalars for the window of steps
        (`window_first_step`, `step`], which began at time `window_start`.

        The ETA is at the window's pace: the run's first window includes tracing the
        steps, so the first ETA is an upper bound that settles at the second line.
        """
        nll, tokens = self.window.numpy()
        loss = nll / max(tokens, 1.0)
        self.last_train_loss.assign(loss)
        self.window.assign([0.0, 0.0])
        seconds = max(time.time() - window_start, 1e-9)
        rate = tokens / seconds
        eta = seconds / max(step - window_first_step, 1) * (self.config.train_steps - step)
        perplexity = _perplexity(loss)
        logging.info("step %d/%d  loss %.4f  ppl %.2f  %.0f tokens/s  eta %s", step,
                     self.config.train_steps, loss, perplexity, rate, _duration(eta))
        with self.writer.as_default(step=step):
            tf.summary.scalar("loss", loss)
            tf.summary.scalar("perplexity", perplexity)
            tf.summary.scalar("learning_rate", float(self.optimizer.learning_rate))
            tf.summary.scalar("tokens_per_second", rate)
            self._log_balance()


class RunStopped(Exception):
    """Training stopped before its last step; the message says why and what was kept."""

    exit_status = 1


class StoppedBySignal(RunStopped):
    """Training stopped at a SIGTERM or SIGINT, after checkpointing its step."""

    def __init__(self, signal_number: int):
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number

    @property
    def exit_status(self) -> int:
        """The shell's status for a process ended by the signal (143 for SIGTERM)."""
        return 128 + self.signal_number


@contextlib.contextmanager
def _stop_requests():
    """While active, SIGTERM and SIGINT append their number to the yielded list instead
    of ending the process (main thread only: elsewhere the list stays empty)."""
    requests = []
    if threading.current_thread() is not threading.main_thread():
        yield requests
        return
    previous = {number: signal.signal(number, lambda number, _: requests.append(number))
                for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield requests
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


def _checkpoints_newest_first(directory: str):
    """The paths (prefixes) of the checkpoints in `directory`, newest first: every
    `ckpt-N.index` there, whatever the state file says (it may be the corrupt file)."""
    pattern = re.compile(r"ckpt-(\d+)\.index$")
    steps = [int(match.group(1)) for name in tf.io.gfile.glob(os.path.join(directory, "*"))
             if (match := pattern.search(name))]
    return [os.path.join(directory, f"ckpt-{step}") for step in sorted(steps, reverse=True)]


def _nonfinite_names(nonfinite: np.ndarray, variables) -> str:
    """What a step's flags (`Placement.train_step`) say was not finite, in words."""
    names = [variable.path for variable, flag in zip(variables, nonfinite[1:]) if flag]
    parts = ["the loss"] if nonfinite[0] else []
    if names:
        listed = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3
                                         else "")
        parts.append(f"the gradients of {listed}")
    return " and ".join(parts)


def _perplexity(mean_nll: float) -> float:
    """exp(mean NLL); inf where that overflows a float (a diverged run)."""
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return float("inf")


def _first_line(error: Exception) -> str:
    """An error's message in one line, without TensorFlow's op decorations."""
    message = getattr(error, "message", None) or str(error) or type(error).__name__
    message = re.sub(r"\{\{[^}]*\}\}|\[Op:\w+\]", "", message)
    return message.strip().splitlines()[0].strip()


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s"
