"""The run configuration a training run records in its `--model_dir` (run_config.json),
and the check that a resumed run has the same one."""

import dataclasses
import json
import os
from typing import Callable, Dict, Optional

import tensorflow as tf

CONFIG_FILE = "run_config.json"


def write_json_atomically(path: str, value) -> None:
    tmp = path + ".tmp"
    with tf.io.gfile.GFile(tmp, "w") as f:
        json.dump(value, f, indent=2, sort_keys=True)
    tf.io.gfile.rename(tmp, path, overwrite=True)


def read_run_config(model_dir: str) -> Optional[Dict]:
    """The run configuration recorded in `model_dir`, or None if it holds no run."""
    return read_json(os.path.join(model_dir, CONFIG_FILE))


def read_json(path: str) -> Optional[Dict]:
    """The JSON object in `path`, or None if there is no such file."""
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        return json.load(f)


def check_run_config(model_dir: str, run_config: Dict, *, write: bool = True,
                     upgrade: Optional[Callable[[Dict], Dict]] = None) -> None:
    """Refuses a model_dir trained with another configuration; records it for a new one
    (if `write`: processes other than the chief only check).

    `upgrade`, if given, turns the recorded configuration into today's layout before the
    comparison (runs recorded by an earlier version); the file is left as it is.
    Called before anything is written to the directory, so a refused run changes nothing.
    """
    stored = read_run_config(model_dir)
    if stored is not None:
        if upgrade is not None:
            stored = upgrade(stored)
        # Flattened, and a setting a run does not record counts as None: a run recorded
        # before a setting existed (whose default is None) resumes with the default.
        stored, flat = _flatten(stored), _flatten(run_config)
        differences = {key: (stored.get(key), flat.get(key))
                       for key in sorted(set(stored) | set(flat))
                       if stored.get(key) != flat.get(key)}
        if differences:
            listed = "; ".join(f"--{key}: was {old!r}, now {new!r}"
                               for key, (old, new) in differences.items())
            raise ValueError(
                f"--model_dir={model_dir} holds a run with another configuration "
                f"({listed}). Use a new --model_dir, or the same flags to resume.")
        return
    if write:
        tf.io.gfile.makedirs(model_dir)
        write_json_atomically(os.path.join(model_dir, CONFIG_FILE), run_config)


def _flatten(run_config: Dict, prefix: str = "") -> Dict:
    """{"model": {"moe": {"k": 4}}, "seed": 0} -> {"model.moe.k": 4, "seed": 0}."""
    flat = {}
    for key, value in run_config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def upgrade_run_config(config_class: type, run_config: Dict) -> Dict:
    """A recorded run config in today's layout: its "model" as `config_class.from_dict`
    reads it (MoE settings nested in "moe", also for runs recorded before), and adam as
    the optimizer of runs recorded before --optimizer."""
    run_config = dict(run_config)
    try:
        run_config["model"] = dataclasses.asdict(config_class.from_dict(run_config["model"]))
    except (KeyError, TypeError, ValueError):
        pass  # not a config of this model: the comparison lists how it differs
    if run_config.get("optimizer") is None:
        run_config["optimizer"] = "adam"
    return run_config
