# Two entry points for a fresh machine: `make run` (the default graph on the bundled model) and `make test`
# (lint and type checks, then every test). `make test-fast` is the everyday subset (no slow, browser, Ray or
# toy-model tests); `make lint` runs ruff and mypy alone.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
TYPECHECK := build/typecheck
FAST := not slow and not browser and not ray and not toy

.PHONY: run test test-fast lint install

# torch and torchvision first, pinned as a pair: spandrel (the upscale model loader) imports torchvision, and a
# torchvision only imports beside the torch it was built for (PyPI's builds do not import beside the CPU build
# of torch 2.13.0 that lies on disk, so this is the local 2.14.1 + 0.29.1 pair, a CUDA build that also runs on the
# CPU). k-diffusion (the samplers' reference in the tests) without its requirements: they pull wandb, accelerate,
# clean-fid and more; what its sampling module needs is in the test extra.
$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[test,ray]'
	$(BIN)/pip install -q --no-deps k-diffusion==0.1.1.post1
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/latentloom run graphs/txt2img.json --output-dir output

# mypy cannot follow setuptools' editable finder that maps engine/, nodes/, server/ to latentloom.*: it checks
# a tree of symlinks with those names instead, and its report is mapped back to the source paths.
lint: install
	$(BIN)/ruff check .
	rm -rf $(TYPECHECK) && mkdir -p $(TYPECHECK)/latentloom
	for package in engine nodes server; do ln -s ../../../$$package $(TYPECHECK)/latentloom/$$package; done
	$(BIN)/mypy -p latentloom.engine -p latentloom.nodes -p latentloom.server > build/mypy.txt; \
		status=$$?; sed 's|^$(TYPECHECK)/latentloom/||' build/mypy.txt; exit $$status

test: lint
	bash tools/install_browser.sh
	$(BIN)/python -m pytest -q tests

# test-fast spreads the tests over the machine's cores (pytest-xdist) and lets pytest keep its rewritten test
# modules as bytecode even where PYTHONDONTWRITEBYTECODE is set (re-rewriting them costs seconds per run).
test-fast: install
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -m pytest -q -n auto -m "$(FAST)" tests
