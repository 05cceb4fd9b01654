# triphase — the two commands of the README, plus the checks `make test` runs.
# Both create or reuse the cached virtual environment (scripts/venv.sh) themselves.
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV = $(shell bash scripts/venv.sh)
PY = $(VENV)/bin/python

PROMPT ?= Explain in two sentences why splitting prefill and decode across machines helps LLM serving.
PORT ?= 8000

.PHONY: help up generate test lint unit bench gpu-check venv k8s-tools prometheus-tools

help:
	@echo "make up     router + prefill + decode workers on 127.0.0.1:$(PORT) (OpenAI API), bundled model"
	@echo "make generate  one chat generation on the in-process engine"
	@echo "make test   lint + type check + architecture contracts + all tests"
	@echo "make bench  engine benchmark -> BENCHMARKS.md"
	@echo "make gpu-check  every GPU claim measured on this machine's GPU -> benchmarks/gpu.json, BENCHMARKS.md"

venv:
	@bash scripts/venv.sh

# The local disaggregated stack: router on 127.0.0.1:$(PORT) + 1 prefill + 1 decode worker.
up:
	@$(PY) -m triphase.cli up --port $(PORT)

# One chat generation on the in-process engine, with tokens/s.
generate:
	@$(PY) -m triphase.cli generate --chat --prompt "$(PROMPT)" --max-tokens 96

lint:
	@echo "== ruff"; $(VENV)/bin/ruff check .
	@echo "== mypy"; $(VENV)/bin/mypy
	@echo "== import-linter"; $(VENV)/bin/lint-imports

# Kubernetes binaries for the control-plane tests, built once from the Go module proxy into the cache.
k8s-tools:
	@$(PY) -m triphase.cli cluster build >/dev/null

# prometheus and promtool for the planner and alert-rule tests, built the same way.
prometheus-tools:
	@$(PY) -m triphase.cli prometheus build >/dev/null

test: lint k8s-tools prometheus-tools
	@echo "== pytest"; $(PY) -m pytest

unit:
	@$(PY) -m pytest tests/unit -q

bench:
	@$(PY) benchmarks/engine.py

# On a machine with a GPU (about 5 minutes on one H100): see benchmarks/gpu.py for what it checks.
gpu-check:
	@$(PY) benchmarks/gpu.py $(GPU_CHECK_ARGS)
