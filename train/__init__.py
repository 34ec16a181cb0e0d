"""Training binaries, data pipelines and serving for the paper's models."""

import os

# TensorFlow's C++ start-up chatter (CUDA probing on CPU-only machines) hides the
# progress lines; warnings and errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
