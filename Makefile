# The two commands a user needs: `make repro` and `make test`. Everything else is a helper.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# dvc runs each stage's `python -m pipeline ...` with this PATH, so stages use the project's venv.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: install repro paper real sweep audit test test-slow bench dag clean

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
PRESET ?= params.real.yaml
OUT ?= reports/experiment
real: $(STAMP)  ## the experiment on real corpora (../shared/mirror) as DVC experiments: PRESET=params.real.yaml (SmolLM2) or params.real-scratch.yaml (the scratch model, OUT=reports/experiment-scratch); PLAN=headline (base, ce, DExperts, the method), PLAN=full (+ seeds 1, 2 and the ablations) or PLAN=dexperts (+ DExperts at alpha 0.5, 1, 2); table in $(OUT)
	$(BIN)/python -m pipeline experiment run --preset $(PRESET) --plan $(PLAN) --out $(OUT)

sweep: $(STAMP)  ## the stage-1 sweep on SmolLM2 (params.real.yaml, one setting at a time) as DVC experiments; table in reports/sweep
	$(BIN)/python -m pipeline experiment sweep --preset params.real.yaml --out reports/sweep

# The audit on real data (README, "Headline results"): the judge trained on the mirror's DiaSafety and
# ToxiChat, on DiaSafety's eight chatbots' replies to its validation contexts and ToxiChat's two chatbots.
G := ../shared/corpora/diasafety/generations
AUDIT_FILES := {$(foreach m,blenderbot_small blenderbot_medium blenderbot_large dialogpt_small dialogpt_medium dialogpt_large plato2_base plato2_large,$(m): {path: $(G)/$(m)_val.json},) toxichat_dialogpt: {path: data/normalized/toxichat/test.parquet, responder: dialogpt}, toxichat_gpt3: {path: data/normalized/toxichat/test.parquet, responder: gpt3}}
# AUDIT_PRESET=params.real.yaml: with that preset's judge (TF-IDF averaged with MiniLM fine-tuned on the pair, about
# 33 min of training on two cores) and its base model; default: params.yaml (the TF-IDF judge, minutes).
AUDIT_PRESET ?= params.yaml
audit: $(STAMP)  ## the audit on real data (../shared): the judge on ten chatbots' replies, as a DVC experiment (AUDIT_PRESET=params.real.yaml: the ensemble judge); table in reports/audit_report
	$(if $(filter-out params.yaml,$(AUDIT_PRESET)),cp $(AUDIT_PRESET) params.yaml &&) $(BIN)/dvc exp run -S corpora.source=mirror -S '++corpora.overrides.mic=sample' -S '++corpora.overrides.prosocial_dialog=sample' -S '~audit.files' -S "+audit.files=$(AUDIT_FILES)" audit_report; status=$$?; git checkout params.yaml; exit $$status  # dvc exp run rewrote params.yaml in place
