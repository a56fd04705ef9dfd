# The two commands of the README: `make demo` (set up, run the main job) and `make test`
# (set up, run the whole test suite). `.ci/run` calls `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
CVXDIST := $(PYTHON) -m cvxdist.cli

.PHONY: setup setup-test setup-bench data test demo lint

# The main job's runtime and the ONNX export it reports (onnxruntime, jax2onnx): no
# TensorFlow (the `data` extra reads TFDS datasets).
setup:
	$(PIP) install -q -e ".[export]"

# The tests also cover TFDS (through tfds.testing.mock_data), so they install the `data` extra.
setup-test:
	$(PIP) install -q -e ".[test,data]"

# pyscnn (the reference solver we benchmark against) declares torchvision, which drags in a
# multi-GB CUDA torch that pyscnn never imports; install a CPU torch and pyscnn without deps.
setup-bench: setup-test
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q --no-deps "pyscnn==0.0.10" "linalg_backends==0.0.1b0"

# Fashion-MNIST from its Debian package: apt-get as root, else extracted into the user cache.
# Where neither works (no apt, no network) the demo falls back to digits and the tests that
# need the dataset skip, so a failure here does not stop the target.
data:
	-$(CVXDIST) data fetch fashion_mnist

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

# The tests run in worker processes (pytest-xdist, as many as cores, at most 4): a 2-core
# machine runs them in about half the time, and no process compiles the whole suite's
# programs (one that did aborted once inside native code after ~520 tests).
test: setup-bench
	$(MAKE) data lint
	$(PYTHON) -m pytest -q -n auto --maxprocesses 4

demo: setup
	$(MAKE) data
	$(CVXDIST) demo --out runs/demo
