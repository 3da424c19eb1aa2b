"""The C part of the build: shimmy/_ringcore.c, the ring's per-message paths, and
shimmy/_relaycore.c, the peer relay's per-batch paths (pyproject.toml holds everything else).
Optional: where no C compiler is found, pip still installs Shimmy and the Python versions of
those paths run (shimmy.ring.ACCELERATED and daemon/peer/relay.py's ACCELERATED tell which)."""

from setuptools import Extension, setup

FLAGS = ["-O2", "-std=c11", "-Wall", "-Wextra", "-Wno-missing-field-initializers",
         "-Wno-unused-parameter", "-Wno-cast-function-type"]

setup(ext_modules=[
    Extension("shimmy._ringcore", ["shimmy/_ringcore.c"], depends=["shimmy/_ringcore.h"],
              optional=True, extra_compile_args=FLAGS),
    Extension("shimmy._relaycore", ["shimmy/_relaycore.c"], depends=["shimmy/_ringcore.h"],
              optional=True, extra_compile_args=FLAGS),
])
