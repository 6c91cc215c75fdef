# The README's two commands: `make run` (install, then train the book's model on The Time Machine)
# and `make test` (install, then run the test suite). Both set everything up on a fresh machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The corpora folder; named corpora are otherwise searched in the cache and downloaded.
RNNLAB_DATA ?= $(abspath ../shared/data)
export RNNLAB_DATA

.PHONY: install run test test-slow clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/activate pyproject.toml constraints.txt
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[torch,jax,dev,serve]"
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/rnnlab train --out runs/book --overwrite

test: install
	$(BIN)/python -m pytest -q

test-slow: install
	$(BIN)/python -m pytest -q -m slow

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
