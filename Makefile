# The two commands a user needs: `make repro` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# dvc runs each stage's `python -m pipeline ...` with this PATH, so stages use the project's venv.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install repro paper real test test-slow bench dag clean

install: $(STAMP)  ## create .venv with the pinned dependencies (offline-safe once cached)

$(STAMP): requirements.lock pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -r requirements.lock
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

repro: $(STAMP)  ## run the whole pipeline (dvc repro) with params.yaml
	$(BIN)/dvc repro

test: $(STAMP)  ## the default test suite (slow tests excluded)
	$(BIN)/python -m pytest

test-slow: $(STAMP)  ## the slow suite: end-to-end dvc repro, reliability (exit 5, no tests, is fine)
	$(BIN)/python -m pytest -m slow; status=$$?; [ $$status -eq 0 ] || [ $$status -eq 5 ]

bench: $(STAMP)  ## benchmarks in bench/, printed as ratios against baselines
	$(BIN)/python -m bench

dag: $(STAMP)
	$(BIN)/dvc dag

clean:  ## remove pipeline outputs (keeps .venv and the DVC cache)
	rm -rf data/raw data/normalized data/groups data/candidates models/* reports/*

paper: $(STAMP)  ## switch to the paper-scale configuration (hub corpora, pretrained models, GPUs) and run it
	cp params.paper.yaml params.yaml
	$(BIN)/dvc repro

PLAN ?= headline
real: $(STAMP)  ## the experiment on real corpora (params.real.yaml, ../shared/mirror) as DVC experiments: PLAN=headline (base, ce, the method; about an hour on 2 cores) or PLAN=full (+ seeds 1, 2 and the ablations; about 3 h); table in reports/experiment
	$(BIN)/python -m pipeline experiment run --preset params.real.yaml --plan $(PLAN) --out reports/experiment
