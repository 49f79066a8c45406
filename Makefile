# The two commands first: `make demo` runs the whole pipeline on a local ESI simulator; `make test` runs the tests.
VENV   := .venv
PYTHON := $(VENV)/bin/python
# What is installed: the hashed locks of every package, transitive ones too (`make lock` makes them from
# requirements.txt and requirements-dev.txt, the lists people edit).
LOCKS  := requirements.lock requirements-dev.lock
STAMP  := $(VENV)/.installed-$(shell cat $(LOCKS) | cksum | cut -d' ' -f1)
COMPILE = CUSTOM_COMPILE_COMMAND="make lock" $(PYTHON) -m piptools compile --quiet --generate-hashes \
          --allow-unsafe --strip-extras --no-emit-index-url --no-emit-find-links

.PHONY: demo demo-serve test lint lock pin-images test-faults bench screenshot services clean

demo: $(STAMP)
	$(PYTHON) -m devtools.demo

# The demo kept running until Ctrl-C, with the status app's /login to add simulated pilots in a browser.
demo-serve: $(STAMP)
	$(PYTHON) -m devtools.demo --serve

test: $(STAMP)
	$(PYTHON) -m pytest -q -rs

# ruff on the whole tree, then mypy on the modules pyproject.toml names; both configured there.
lint: $(STAMP)
	$(PYTHON) -m ruff check .
	$(PYTHON) -m mypy

test-faults: $(STAMP)
	$(PYTHON) -m pytest -q -rs tests/faults

bench: $(STAMP)
	$(PYTHON) bench/run.py

# docs/status.png from a throwaway database and queue (`python -m devtools.embed_screenshot` makes docs/embed.png).
screenshot: $(STAMP)
	$(PYTHON) -m devtools.screenshot docs/status.png

# Start the local PostgreSQL and RabbitMQ where they are installed but stopped (Debian packages).
services:
	@./.ci/services

$(STAMP): $(LOCKS)
	test -x $(PYTHON) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --disable-pip-version-check --require-hashes -r requirements-dev.lock
	rm -f $(VENV)/.installed-* && touch $@

# After editing requirements.txt or requirements-dev.txt: pins what they name, and what that needs, with hashes.
# The development lock takes the runtime lock's versions, so tests run what the image ships.
lock: $(STAMP)
	$(COMPILE) --output-file requirements.lock requirements.txt
	$(COMPILE) --constraint requirements.lock --output-file requirements-dev.lock requirements-dev.txt

# The Dockerfile's and docker-compose.yml's images pinned to the digests their tags point at now.
pin-images: $(STAMP)
	$(PYTHON) devtools/pin_images.py

clean:
	rm -rf $(VENV) .pytest_cache
