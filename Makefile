# The two commands first: `make demo` runs the whole pipeline on a local ESI simulator; `make test` runs the tests.
VENV   := .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt | cksum | cut -d' ' -f1)

.PHONY: demo demo-serve test lint test-faults bench screenshot services clean

demo: $(STAMP)
	$(PYTHON) devtools/demo.py

# The demo kept running until Ctrl-C, with the status app's /login to add simulated pilots in a browser.
demo-serve: $(STAMP)
	$(PYTHON) devtools/demo.py --serve

test: $(STAMP)
	$(PYTHON) -m pytest -q

# ruff, configured in pyproject.toml, on the whole tree.
lint: $(STAMP)
	$(PYTHON) -m ruff check .

test-faults: $(STAMP)
	$(PYTHON) -m pytest -q tests/faults

bench: $(STAMP)
	$(PYTHON) bench/run.py

screenshot: $(STAMP)
	$(PYTHON) -m tests.screenshot docs/status.png

# Start the local PostgreSQL and RabbitMQ where they are installed but stopped (Debian packages).
services:
	@./.ci/services

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --disable-pip-version-check -r requirements-dev.txt
	rm -f $(VENV)/.installed-* && touch $@

clean:
	rm -rf $(VENV) .pytest_cache
