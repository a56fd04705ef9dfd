# The two commands of the README: `make demo` (set up, run the main job) and `make test`
# (set up, run the whole test suite). `.ci/run` calls `make test`.
PYTHON ?= python3
PIP := $(PYTHON) -m pip

.PHONY: setup setup-bench test demo lint

setup:
	$(PIP) install -q -e ".[test,data]"

# pyscnn (the reference solver we benchmark against) declares torchvision, which drags in a
# multi-GB CUDA torch that pyscnn never imports; install a CPU torch and pyscnn without deps.
setup-bench: setup
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q --no-deps "pyscnn==0.0.10" "linalg_backends==0.0.1b0"

lint:
	$(PYTHON) -m ruff check .
	$(PYTHON) -m ruff format --check .

test: setup-bench
	$(MAKE) lint
	$(PYTHON) -m pytest -q

demo: setup
	cvxdist demo --out runs/demo
