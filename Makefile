# Two entry points that work on a fresh machine: `make demo` (the main job) and `make test` (`make test-all`: every test).
# Both create .venv when it is missing, with the CPU build of torch 2.13.0 installed first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test test-all lint clean

$(PY): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(PY)

venv: $(PY)

demo: $(PY)
	SWANLAB_MODE=$${SWANLAB_MODE:-local} $(PY) recipes/demo.py

# The fast tests (about 2 minutes on 2 cores); `test-all` adds the multi-process, torchrun, server and
# fault-injection ones (`@pytest.mark.slow`).
test: $(PY)
	SWANLAB_MODE=disabled $(PY) -m pytest -q -m "not slow" tests

test-all: $(PY)
	SWANLAB_MODE=disabled $(PY) -m pytest -q tests

lint: $(PY)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

clean:
	rm -rf out
