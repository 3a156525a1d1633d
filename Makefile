# The README's two commands. Both set up .venv from nothing (torch pinned to the CPU wheel).
VENV := .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export DS_ACCELERATOR ?= cpu
export WANDB_MODE ?= offline
export PYTHONUNBUFFERED := 1

.PHONY: demo test setup bench clean

$(VENV)/.installed: setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

setup: $(VENV)/.installed

demo: setup
	deepspeed launch/train.py +mixer=bandit hydra.run.dir=outputs/demo/bandit
	deepspeed launch/train.py +mixer=static hydra.run.dir=outputs/demo/static logger=none
	$(PY) launch/compare.py outputs/demo

test: setup
	$(PY) -m pytest -n 2 tests

bench: setup
	$(PY) bench/run_all.py

clean:
	rm -rf outputs multirun wandb bench/results
