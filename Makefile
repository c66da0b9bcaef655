# Set-up and entry points. `make demo` and `make test` work on a fresh clone with only python3.
PYTHON ?= python3
# The CPU build of torch; override (e.g. TORCH=torch) for a CUDA machine.
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard fusion/csrc/*.c fusion/csrc/*.h)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

demo: $(STAMP)
	$(BIN)/fusion demo

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis
