"""Runs `train.lm` with TFDS replaced by `tfds.testing.mock_data` (no download here).

Usage: python tfds_mock_runner.py [train.lm flags]
"""

import sys

import tensorflow_datasets as tfds
from absl import app

from train import lm

if __name__ == "__main__":
    with tfds.testing.mock_data(num_examples=64):
        app.run(lm.main, argv=["train.lm"] + sys.argv[1:])
