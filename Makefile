# The README's two commands. Both set up .venv from nothing (torch pinned to the CPU wheel).
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DS_ACCELERATOR ?= cpu
export WANDB_MODE ?= offline
export PYTHONUNBUFFERED := 1

# A free port for every launcher call (DeepSpeed's default 29500 may be held by another job).
FREE_PORT = $(shell $(PY) -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
DEMO_ARGS ?=

.PHONY: demo test test-slow setup bench clean

$(VENV)/.installed: pyproject.toml setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

setup: $(VENV)/.installed

demo: setup
	deepspeed --master_port $(FREE_PORT) launch/train.py +mixer=bandit hydra.run.dir=outputs/demo/bandit trainer.overwrite=true $(DEMO_ARGS)
	deepspeed --master_port $(FREE_PORT) launch/train.py +mixer=static hydra.run.dir=outputs/demo/static logger=none trainer.overwrite=true $(DEMO_ARGS)
	$(PY) launch/compare.py outputs/demo

# two test workers on two cores: one thread each (oversubscribed BLAS threads run tiny models far slower)
test: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 -m "not slow" tests

test-slow: setup
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 -m slow tests

bench: setup
	$(PY) bench/run_all.py

clean:
	rm -rf outputs multirun wandb bench/results
