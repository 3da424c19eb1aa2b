# The two commands a newcomer needs (see README):
#   make demo   install, start an embedded daemon, run live traffic between processes
#   make test   install everything (Docker engine included, as root) and run the whole suite
PYTHON ?= python3

.PHONY: demo test install install-dev bench

# Editable installs: the package maps sdk/ and daemon/ into shimmy.sdk and shimmy.daemon, and an
# editable install resolves that mapping even when run from this folder (where the plain
# shimmy/ folder would otherwise shadow an installed copy).
install:
	$(PYTHON) -m pip install -q -e .

install-dev:
	$(PYTHON) -m pip install -q -e '.[dev,daemon]'

demo: install
	$(PYTHON) -m shimmy.cli demo

# Unit and multi-process tests first, then the real-container tests, which install and start a
# Docker engine from Debian packages when none answers (needs root and apt).
test: install-dev
	$(PYTHON) -m pytest -m "not container"
	bash .ci/containers.sh

bench: install-dev
	$(PYTHON) -m shimmy.cli bench
