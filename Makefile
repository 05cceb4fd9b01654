# triphase — the two commands of the README, plus the checks `make test` runs.
# Both create or reuse the cached virtual environment (scripts/venv.sh) themselves.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV = $(shell bash scripts/venv.sh)
PY = $(VENV)/bin/python

PROMPT ?= Explain in two sentences why splitting prefill and decode across machines helps LLM serving.
PORT ?= 8000

.PHONY: help up test lint unit bench venv

help:
	@echo "make up     run the bundled model (SmolLM2-135M-Instruct) with the triphase engine"
	@echo "make test   lint + type check + architecture contracts + all tests"
	@echo "make bench  engine benchmark -> BENCHMARKS.md"

venv:
	@bash scripts/venv.sh

# Until the router lands this runs one chat generation on the local engine and prints tokens/s.
up:
	@$(PY) -m triphase.cli generate --chat --prompt "$(PROMPT)" --max-tokens 96

lint:
	@echo "== ruff"; $(VENV)/bin/ruff check .
	@echo "== mypy"; $(VENV)/bin/mypy
	@echo "== import-linter"; $(VENV)/bin/lint-imports

test: lint
	@echo "== pytest"; $(PY) -m pytest

unit:
	@$(PY) -m pytest tests/unit -q

bench:
	@$(PY) benchmarks/engine.py
