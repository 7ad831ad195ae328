# The README's two commands: `make quickstart` and `make test`. Each installs what is missing first.
PYTHON ?= python3
# Installed only when no torch is importable, so GPU users keep their own CUDA build.
TORCH_SPEC ?= torch==2.13.0
STAMP := .make/installed
PYTEST_ARGS ?=
# The tested set of exact versions (see the file's header); CONSTRAINTS= installs the newest the ranges allow instead.
CONSTRAINTS ?= constraints.txt

.PHONY: help install test test-gpu quickstart bench reliability-doc lock clean docs

help:  ## list the targets
	@grep -E '^[a-z-]+:.*##' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml $(CONSTRAINTS)
	@mkdir -p $(dir $@)
	@$(PYTHON) -c "import torch" 2>/dev/null || { echo "No importable torch: installing $(TORCH_SPEC) first."; $(PYTHON) -m pip install "$(TORCH_SPEC)"; }
	$(PYTHON) -m pip install -q $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev]"
	@touch $@

install: $(STAMP)  ## install torch (if none) and this package with its dev extra, once

test: install  ## run the whole test suite (CPU; gpu-marked tests run only where CUDA is present)
	$(PYTHON) -m pytest $(PYTEST_ARGS)

.PHONY: test-fast
test-fast: install  ## the edit loop, ~2.5 min on 2 cores: unit and fast integration tests (not slow- or gpu-marked)
	$(PYTHON) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-gpu: install  ## run only the gpu-marked tests
	$(PYTHON) -m pytest -m gpu $(PYTEST_ARGS)

quickstart: install  ## the main job: corpus -> tokenizer -> shards -> train a tiny RoBERTa -> export -> fill-mask
	roberta-pl-train experiment=quickstart

.PHONY: eval-local
eval-local: install  ## the local downstream suite on the quickstart model, pretrained vs random init, 3 seeds each
	roberta-pl-eval runs/quickstart/checkpoints/last.ckpt suite=local seeds=3 out_dir=runs/eval-local-pretrained
	roberta-pl-eval runs/quickstart/checkpoints/last.ckpt suite=local seeds=3 init=random out_dir=runs/eval-local-random

bench: install  ## CPU benchmarks against HuggingFace transformers (figures to bench/results/)
	$(PYTHON) bench/data_throughput.py
	$(PYTHON) bench/train_throughput.py

lock:  ## re-resolve the newest versions in a fresh venv and rewrite constraints.txt (then make test, commit both)
	rm -rf .make/lock-venv
	$(PYTHON) -m venv .make/lock-venv
	.make/lock-venv/bin/pip install -q "$(TORCH_SPEC)"
	.make/lock-venv/bin/pip install -q -e ".[dev]"
	{ sed -n '1,3p' constraints.txt; .make/lock-venv/bin/pip freeze --exclude-editable | grep -v -i -E '^(torch==|nvidia-|triton==)'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .make/lock-venv
	@echo "constraints.txt rewritten: run make test, then commit it"

docs: install  ## regenerate docs/reference/ from the code, then build the site with warnings as errors (build/site)
	$(PYTHON) docs/gen_reference.py
	NO_MKDOCS_2_WARNING=1 $(PYTHON) -m mkdocs build --strict -d build/site

reliability-doc:  ## copy build/reliability.md (written by a full `make test`) over the committed docs/reliability.md
	@test -f build/reliability.md || { echo "no build/reliability.md: run the whole suite (make test) first"; exit 1; }
	cp build/reliability.md docs/reliability.md

clean:  ## remove build stamps and caches (not your runs)
	rm -rf .make .pytest_cache build *.egg-info
