"""The C part of the build: shimmy/_ringcore.c, the ring's per-message paths (pyproject.toml
holds everything else).  Optional: where no C compiler is found, pip still installs Shimmy and
the Python versions of those paths run (shimmy.ring.ACCELERATED tells which)."""

from setuptools import Extension, setup

setup(ext_modules=[Extension("shimmy._ringcore", ["shimmy/_ringcore.c"], optional=True,
                             extra_compile_args=["-O2", "-std=c11", "-Wall", "-Wextra",
                                                 "-Wno-missing-field-initializers",
                                                 "-Wno-unused-parameter",
                                                 "-Wno-cast-function-type"])])
