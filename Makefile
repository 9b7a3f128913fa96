# Two entry points that work on a fresh machine: `make demo` (the main job) and `make test` (`make test-all`: every test).
# Both create .venv when it is missing, with the CPU build of torch 2.13.0 installed first and every other package at
# the version in constraints.txt (the set the tests passed with). `make test-latest` tries today's newest releases
# in .venv-latest, so that the next breaking release is found by a command rather than by a user.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
LATEST := .venv-latest
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: venv demo test test-all test-latest constraints lint clean

$(PY): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
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

# Newest releases of everything but torch (newer torch is a multi-GB CUDA download here), the whole suite.
test-latest:
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install --quiet --upgrade pip
	$(LATEST)/bin/python -m pip install --quiet torch==2.13.0
	echo "torch==2.13.0" > $(LATEST)/torch-pin.txt
	$(LATEST)/bin/python -m pip install --quiet -c $(LATEST)/torch-pin.txt --upgrade --upgrade-strategy eager -e ".[dev]"
	$(LATEST)/bin/python -m pip list 2>/dev/null | grep -iE "^(transformers|trl|peft|datasets|accelerate|tokenizers|fastapi|openai) "
	SWANLAB_MODE=disabled $(LATEST)/bin/python -m pytest -q tests

# Pin what .venv holds now (after a green test-latest, copy its set here with PY=.venv-latest/bin/python).
constraints:
	{ sed -n '1,3p' constraints.txt; $(PY) -m pip freeze --exclude-editable | sed 's/^torch==\(.*\)+cpu$$/torch==\1/'; } > constraints.new
	mv constraints.new constraints.txt

lint: $(PY)
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

clean:
	rm -rf out $(LATEST)
