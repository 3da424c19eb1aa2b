# The two commands a newcomer needs (see README):
#   make demo   make .venv, install Shimmy into it, run the demo (embedded daemon, live traffic)
#   make c      build libshimmy and shimmy-c (the C client, libshimmy/), plain and sanitized
#   make test   make .venv, install Shimmy with its test tools into it, run ruff, mypy, pytest,
#               the real-container tests and (where .ci/rdma.sh exists) the RDMA tests
#   make clean  remove .venv and the build and test leftovers in this folder
#
# Everything Python goes into $(VENV) (default .venv, in this folder), never into the system
# interpreter: distribution interpreters refuse global installs (PEP 668) anyway.  PYTHON picks
# the interpreter the environment is made from (>= 3.10).
PYTHON ?= python3
VENV ?= .venv
VPY := $(VENV)/bin/python

.PHONY: demo test lint unit containers rdma bench clean venv c

# Made once; tools/venv.sh installs python3.X-venv with apt-get when the interpreter lacks it.
$(VENV)/bin/python:
	bash tools/venv.sh "$(PYTHON)" "$(VENV)"

venv: $(VPY)

# Editable installs: the package maps sdk/ and daemon/ into shimmy.sdk and shimmy.daemon, and an
# editable install resolves that mapping even when run from this folder (where the plain shimmy/
# folder would otherwise shadow an installed copy).  Redone when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(VPY)
	$(VPY) -m pip install -q --disable-pip-version-check -e '.[demo]'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(VPY)
	$(VPY) -m pip install -q --disable-pip-version-check -e '.[dev,daemon,demo]'
	touch $@ $(VENV)/.installed

# libshimmy (the C client) and shimmy-c, plain and under AddressSanitizer + UBSan for the tests
# (libshimmy/Makefile); libshimmy/deps.sh installs gcc and libmsgpack-dev with apt-get as root
# when missing, as tools/venv.sh does for the C extension.
c:
	bash libshimmy/deps.sh
	$(MAKE) -C libshimmy all asan

demo: $(VENV)/.installed
	-bash libshimmy/deps.sh && $(MAKE) -C libshimmy all
	$(VPY) -m shimmy.cli demo

lint: $(VENV)/.installed-dev
	$(VPY) -m ruff check .
	$(VPY) -m mypy

# The ring's per-message paths and the peer relay's per-batch paths exist twice (shimmy/_ringcore.c
# and shimmy/_relaycore.c, and their Python twins in shimmy/ring/ and daemon/peer/mirror.py): their
# tests run once more with the Python versions.
TWIN_TESTS := tests/test_ring_core.py tests/test_ring_crash.py tests/test_ring_validation.py \
	tests/test_batch.py tests/test_pubsub.py tests/test_multipub.py tests/test_zero_copy.py \
	tests/test_peer_readahead.py tests/test_peer_transport.py tests/test_peer_mirror.py

unit: $(VENV)/.installed-dev c
	$(VPY) -m pytest -m "not container and not rdma"
	SHIMMY_PURE_PYTHON=1 $(VPY) -m pytest -q $(TWIN_TESTS)

# Docker engine from Debian packages when none answers (needs root and apt); see .ci/containers.sh
# for what it starts, builds and removes.
containers: $(VENV)/.installed-dev
	PYTHON="$(abspath $(VPY))" bash .ci/containers.sh

rdma: $(VENV)/.installed-dev
	if [ -f .ci/rdma.sh ]; then PYTHON="$(abspath $(VPY))" bash .ci/rdma.sh; \
	else echo "no .ci/rdma.sh: RDMA tests skipped"; fi

test: lint unit containers rdma

bench: $(VENV)/.installed-dev
	$(VPY) -m shimmy.cli bench

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis \
		bench-results libshimmy/build libshimmy/build-asan
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
