VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The CPU build of torch: an unpinned torch pulls a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install demo demo-model test lint bench-load bench-image bench-generate bench-finetune bench-quantize bench-engine eval-demo bench-eval bench-serve bench-structured clean

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

# Decode speed and weight memory: fp32 / bf16 / int8 / int4 side by side (CPU bench preset), int4 sizes of 9b and 80b.
bench-quantize: install
	$(PY) benchmarks/quantize.py

bench-engine: install
	$(PY) benchmarks/engine.py

# Structured outputs: engine decode tok/s with a JSON-schema constraint vs free, compile times, llguidance vs xgrammar.
bench-structured: install
	$(PY) benchmarks/structured.py

# Few-shot evaluation of the demo model (0 and 4 shots) on rendered shapes: VQA accuracy and CIDEr, as tables.
EVAL_DEMO := build/eval-demo
eval-demo: install
	$(PY) -m idefics.demo.eval_sets --output $(EVAL_DEMO)
	$(VENV)/bin/idefics eval --task vqa --shots 0,4 --trials 3 --output $(EVAL_DEMO)/runs/vqa \
	  --questions $(EVAL_DEMO)/vqa/val_questions.json --annotations $(EVAL_DEMO)/vqa/val_annotations.json \
	  --images $(EVAL_DEMO)/vqa/val --train-questions $(EVAL_DEMO)/vqa/train_questions.json \
	  --train-annotations $(EVAL_DEMO)/vqa/train_annotations.json --train-images $(EVAL_DEMO)/vqa/train
	$(VENV)/bin/idefics eval --task caption --shots 0,4 --trials 3 --output $(EVAL_DEMO)/runs/caption \
	  --annotations $(EVAL_DEMO)/caption/val_captions.json --images $(EVAL_DEMO)/caption/val \
	  --train-annotations $(EVAL_DEMO)/caption/train_captions.json --train-images $(EVAL_DEMO)/caption/train

bench-eval: install
	$(PY) benchmarks/eval.py

# `idefics serve` under load (openai-chat, image data URIs, 16 concurrent clients) vs one request at a time.
bench-serve: install
	$(PY) benchmarks/serve_load.py --launch --num-requests 64 --max-concurrency 16 --max-tokens 64 --engine-baseline

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info .pytest_cache
