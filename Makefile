# tdd: make help lists the targets.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PY := $(BIN)/python

.DEFAULT_GOAL := help
.PHONY: help install test test-full lint run sweep bench memory profile toy-assets clean

help: ## Show this help
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip setuptools wheel

install: $(PY) ## Create .venv and install tdd with its dev extras (torch/torchvision as a pair)
	$(BIN)/pip install -e '.[dev]'

test: ## Run the fast test suite
	$(BIN)/pytest -q -p no:cacheprovider

test-full: ## Run every test, the slow ones included
	$(BIN)/pytest -q -p no:cacheprovider -m "slow or not slow"

lint: ## Lint with ruff
	$(BIN)/ruff check tdd tests run.py

run: ## The main job: TDD with decoupled guidance
	$(PY) run.py strategy=tdd guidance=decoupled

sweep: ## All four strategies as a Hydra multirun
	$(PY) run.py -m strategy=tdd,lcm,tcd,pcm

memory: ## Peak memory of one LoRA step on the SD1.5/SDXL UNet configs (random weights, JSON)
	$(PY) -m tdd.bench memory

profile: ## Where the main job's time goes: 30 steps + a 64-image evaluation, scaled (JSON + table)
	$(PY) -m tdd.bench profile --out outputs/profile.json

toy-assets: ## Rebuild the toy VAE, evaluator, UNet and flow teachers, records (resumes .toy-work/)
	$(PY) -m tdd.toy.build all --work .toy-work --threads 2

bench: ## Benchmark: step time vs its floor and the scripts' way, sampling speed, memory (JSON)
	$(PY) -m tdd.bench

clean: ## Remove run outputs and caches
	rm -rf outputs multirun .pytest_cache .ruff_cache
