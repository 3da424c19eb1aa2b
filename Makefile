# The two commands a newcomer needs (see README):
#   make demo   install, start an embedded daemon, run live traffic between processes
#   make test   install everything (Docker engine included, as root) and run the whole suite
PYTHON ?= python3

.PHONY: demo test install install-dev bench

install:
	$(PYTHON) -m pip install -q .

install-dev:
	$(PYTHON) -m pip install -q -e '.[dev,daemon]'

demo: install
	shimmy demo

# Unit and multi-process tests first, then the real-container tests, which install and start a
# Docker engine from Debian packages when none answers (needs root and apt).
test: install-dev
	$(PYTHON) -m pytest -m "not container"
	bash .ci/containers.sh

bench: install-dev
	shimmy bench
