"""Runs a training binary with TFDS replaced by `tfds.testing.mock_data` (no download here).

Usage: python tfds_mock_runner.py [MODULE] [flags]
MODULE is the binary's module (`train.lm`, the default, or `train.nmt`); the flags are
its own.
"""

import importlib
import sys

import tensorflow_datasets as tfds

if __name__ == "__main__":
    has_module = len(sys.argv) > 1 and not sys.argv[1].startswith("-")
    module_name = sys.argv[1] if has_module else "train.lm"
    flags = sys.argv[2:] if has_module else sys.argv[1:]
    binary = importlib.import_module(module_name)
    with tfds.testing.mock_data(num_examples=64):
        binary.run(argv=[module_name] + flags)
