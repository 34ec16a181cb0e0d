"""Installs moe_tf (the layer), models (the paper's networks) and train (the binaries)."""

import setuptools

setuptools.setup(
    name="moe_tf",
    version="0.1.0",
    description=(
        "The Sparsely-Gated Mixture-of-Experts layer (Shazeer et al., ICLR 2017) "
        "for TensorFlow and Keras 3."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["moe_tf*", "models*", "train*",
                                               "benchmarks*"]),
    install_requires=[
        "tensorflow==2.21.*",
        "keras>=3.10,<4",
        "tensorflow-text==2.21.*",
        "tensorflow-datasets>=4.9",
        # tfds's download path imports it; without it a real tfds.load('lm1b') fails at once.
        "importlib_resources",
        "absl-py>=2.0",
        "numpy",
        # Learns the subword vocabulary; tokenization itself uses tensorflow-text ops.
        "sentencepiece>=0.2",
        "tensorboard",
        "sacrebleu>=2.0",
        # benchmarks.lm_table's plot.
        "matplotlib",
    ],
    package_data={"train.data": ["bible/*"], "moe_tf": ["kernels/*.cc", "kernels/*.h",
                                                        "kernels/xla_header_stubs/**/*"]},
    entry_points={
        "console_scripts": [
            "moe-train-lm = train.lm:run",
            "moe-score-lm = train.score:run",
            "moe-train-nmt = train.nmt:run",
            "moe-translate = train.translate:run",
        ],
    },
    extras_require={
        # pytest-xdist: `make test` runs the suite in two processes (most of its time is
        # subprocesses of the binaries starting TensorFlow).
        "test": ["pytest>=8", "pytest-xdist>=3", "scipy", "keras-hub==0.32.*"],
        # moe_tf.integrations.keras_hub: sparse experts for keras-hub's MoE models.
        "keras-hub": ["keras-hub==0.32.*"],
    },
)
