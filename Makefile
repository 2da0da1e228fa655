VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU build of torch: an unpinned torch pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install test lint bench-load bench-image bench-generate clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

lint: install
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks

test: lint
	$(VENV)/bin/pytest

bench-load: install
	$(PY) benchmarks/load.py

bench-image: install
	$(PY) benchmarks/image_processing.py

bench-generate: install
	$(PY) benchmarks/generate.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
