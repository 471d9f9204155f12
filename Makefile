# make test  -- set up .venv, build the extension, run the whole test suite
# make demo  -- set up, build, then run the benchmark and a short RetinaNet training + evaluation
#
# The virtual environment lives in .venv at the repository root. The extension is rebuilt
# whenever a file under csrc/ or setup.py changes.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEPS_STAMP := $(VENV)/.deps-installed
BUILD_STAMP := $(VENV)/.focal-built
CSRC := $(shell find csrc -type f) setup.py pyproject.toml

.PHONY: all setup build test demo bench clean

all: test

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS_STAMP): requirements-dev.txt | $(PY)
	$(PIP) install --upgrade pip
	$(PIP) install torch==2.14.1 torchvision==0.29.1
	$(PIP) install -r requirements-dev.txt
	touch $@

setup: $(DEPS_STAMP)

$(BUILD_STAMP): $(DEPS_STAMP) $(CSRC)
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@

build: $(BUILD_STAMP)

test: build
	$(PY) -m pytest tests

bench: build
	$(PY) benchmarks/bench.py

demo: build
	$(PY) benchmarks/bench.py --quick --plot outputs/bench.png --json outputs/bench.json
	$(PY) -m examples.retinanet.train --minutes 3 --out runs/demo

clean:
	rm -rf build focal/_C*.so *.egg-info $(BUILD_STAMP)
