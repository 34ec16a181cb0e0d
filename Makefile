# `make test` and `make train` work on a fresh clone: they create .venv when it is missing.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test train manuals-corpus clean

$(STAMP): setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# The layer's compiled CPU kernels (nothing is built on a CPU without AVX-512 or AVX2; the
# layer then runs TensorFlow ops only). The stamp records the attempt, so that a machine
# that cannot build them does not start TensorFlow to say so at every make.
KERNELS_STAMP := $(VENV)/.kernels
$(KERNELS_STAMP): $(wildcard moe_tf/kernels/*.cc moe_tf/kernels/*.h) moe_tf/kernels/build.py $(STAMP)
	$(PY) -m moe_tf.kernels.build
	touch $(KERNELS_STAMP)

install: $(STAMP) $(KERNELS_STAMP)

# Three pytest processes on two cores: the end-to-end tests spend much of their time
# starting TensorFlow in subprocesses and waiting for them, which a third worker fills
# (see docs/development.md). Each module runs on one worker (`--dist loadscope`): with
# `--dist load` the workers each ran the module-scoped fixtures, the training runs the
# end-to-end tests share. Modules go in tests/conftest.py's order, longest first
# (`--no-loadscope-reorder`). The 25 slowest tests close the report: where the suite's
# 15 minutes go.
test: install
	$(PY) -m pytest -n 3 --dist loadscope --no-loadscope-reorder --durations=25 tests

# The default MoE language model on the built-in English corpus (12 minutes of training
# on a 2-core CPU without AVX-512, 14 in all from a fresh clone), then a sentence scored
# by the exported SavedModel.
RUN_DIR ?= runs/lm_moe
train: install
	$(PY) -m train.lm --model_dir=$(RUN_DIR)
	echo "In the beginning God created the heavens and the earth." | \
		$(PY) -m train.score --saved_model=$(RUN_DIR)/export

# The second built-in corpus (`--data=builtin:manuals`): English prose of the manuals of
# 13 free software packages, built from Debian packages into train/data/manuals/ (needs
# root for apt-get; about 300 MB of packages, 2 minutes of cleaning).
manuals-corpus: install
	DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
		$$($(PY) -m train.data.manuals_corpus --packages)
	$(PY) -m train.data.manuals_corpus

clean:
	rm -rf $(VENV) build *.egg-info moe_tf/kernels/_moe_kernels*.so
