VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU build of torch: an unpinned torch pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install demo demo-model test lint bench-load bench-image bench-generate bench-finetune clean

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH)"
	$(PIP) install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

# The demo model (idefics.DEMO_MODEL) answering questions about the two example images.
demo: install
	@for image in examples/red_circle.png examples/blue_triangle.png; do \
	  for question in "What color is the shape?" "What shape is this?" "Describe the image."; do \
	    printf '%s  User: %s\n%*sAssistant: ' "$$image" "$$question" $${#image} ""; \
	    $(VENV)/bin/idefics generate --image "$$image" "$$question" || exit 1; \
	  done; \
	done

# Retrain the demo model from scratch (rendered data, tokenizer, `idefics finetune --config recipes/demo.yaml`).
demo-model: install
	$(PY) -m idefics.demo --recipe recipes/demo.yaml --install src/idefics/demo_model

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

bench-finetune: install
	$(PY) benchmarks/finetune.py

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
