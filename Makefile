# The README's two commands: `make quickstart` and `make test`. Each installs what is missing first.
PYTHON ?= python3
# Installed only when no torch is importable, so GPU users keep their own CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := .make/installed
PYTEST_ARGS ?=

.PHONY: help install test test-gpu quickstart bench reliability-doc clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@mkdir -p $(dir $@)
	@$(PYTHON) -c "import torch" 2>/dev/null || { echo "No importable torch: installing $(TORCH_SPEC) first."; $(PYTHON) -m pip install "$(TORCH_SPEC)"; }
	$(PYTHON) -m pip install -q -e ".[dev]"
	@touch $@

install: $(STAMP)  ## install torch (if none) and this package with its dev extra, once

test: install  ## run the whole test suite (CPU; gpu-marked tests run only where CUDA is present)
	$(PYTHON) -m pytest $(PYTEST_ARGS)

test-gpu: install  ## run only the gpu-marked tests
	$(PYTHON) -m pytest -m gpu $(PYTEST_ARGS)

quickstart: install  ## the main job: corpus -> tokenizer -> shards -> train a tiny RoBERTa -> export -> fill-mask
	roberta-pl-train experiment=quickstart

bench: install  ## CPU benchmarks against HuggingFace transformers (figures to bench/results/)
	$(PYTHON) bench/data_throughput.py
	$(PYTHON) bench/train_throughput.py

reliability-doc:  ## copy build/reliability.md (written by a full `make test`) over the committed docs/reliability.md
	@test -f build/reliability.md || { echo "no build/reliability.md: run the whole suite (make test) first"; exit 1; }
	cp build/reliability.md docs/reliability.md

clean:  ## remove build stamps and caches (not your runs)
	rm -rf .make .pytest_cache build *.egg-info
