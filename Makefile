# The two commands of the README: `make demo` and `make test`. Both set everything up on a fresh machine.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.vitune-installed

.PHONY: install demo test test-slow lint clean browser

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade "pip>=24"

# torch + torchvision first: pip takes them from the local wheel cache on our machines (no multi-GB download).
$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e ".[dev,qlora]"
	touch $(STAMP)

install: $(STAMP)

# Debian's Chromium for the chat-page browser test (Playwright drives it; no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq chromium >/dev/null) \
	  || echo "chromium could not be installed: the browser test will be skipped"

demo: install
	$(VENV)/bin/vitune demo

test: install browser
	$(PY) -m pytest -q

# the slow tier: fault injection (d)-(f) and the LoRA/QLoRA integration runs (~10 min more on 2 cores)
test-slow: install
	$(PY) -m pytest -q -m slow

lint: install
	$(VENV)/bin/ruff check platform jobs serving tests benchmarks

clean:
	rm -rf $(VENV) runs demo-output .pytest_cache
