# Two entry points for a fresh machine: `make run` (the default graph on the bundled model) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test install

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	# torch first, pinned, so pip takes the CPU build where one lies on disk
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,ray]'
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/latentloom run graphs/txt2img.json --output-dir output

test: install
	bash tools/install_browser.sh
	$(BIN)/python -m pytest -q tests
