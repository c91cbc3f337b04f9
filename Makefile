# The commands a new user runs. `make demo` and `make test` work on a fresh machine: both install first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?=
DEMO   ?= demo
CONFIG ?=

.PHONY: install test demo clean

$(BIN)/reid: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: the CUDA build runs on CPU too, and faiss-gpu 1.15.1 is built against it.
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $(BIN)/reid

install: $(BIN)/reid

test: install
	$(BIN)/pytest -q

demo: install
	$(BIN)/python -m reid.demo --out $(DEMO) $(if $(DATA),--data $(DATA),) $(if $(CONFIG),--config $(CONFIG),)

clean:
	rm -rf $(VENV) runs $(DEMO) .pytest_cache
