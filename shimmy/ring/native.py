"""The C fast paths (shimmy/_ringcore.c): loading them, and refusing them when they disagree.

RingWriter and RingReader subclass the C module's types and keep every other path, and the
reference version of each fast path, in Python.  The C module hard-codes the ring's offsets
and looks up a few Python attributes by name: ``check_layout`` compares its exported constants
with the Python layout, and ``check_lookups`` that every name it looks up exists, both at
import, so a drift fails loudly at import rather than at run time.  This room must never touch
a ring.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

# The per-message paths in C (shimmy/_ringcore.c): RingWriter and RingReader subclass its types
# and keep every other path, and the reference version of each fast path (``_publish_py``,
# ``_take_bytes_py``, ...), here.  Built at install time where a C compiler is found; without it,
# or with SHIMMY_PURE_PYTHON=1 in the environment, the Python versions are the fast paths.
def load(module: str) -> Any:
    """The C module ``module``, or None where it is not built or SHIMMY_PURE_PYTHON=1 asks for
    the Python versions (of this module's paths and of the peer relay's, daemon/peer/relay.py)."""
    if os.environ.get("SHIMMY_PURE_PYTHON"):
        return None
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


_core: Any = load("shimmy._ringcore")
ACCELERATED = _core is not None
_WriterBase: Any = _core.WriterCore if _core else object
_ReaderBase: Any = _core.ReaderCore if _core else object


class CoreMismatch(ImportError):
    """The built C module disagrees with the Python ring (a stale build, or a layout or name
    changed on one side only): refused at import, never discovered in a ring at run time."""


def check_layout(exported: dict[str, int], expected: dict[str, int | None],
                 module: str = "shimmy._ringcore") -> None:
    """Raise CoreMismatch naming the first constant the C ``module`` exports with another value
    than the Python layout's (``exported``: the C module's constants; ``expected``: Python's, by
    the C module's names)."""
    for name, value in expected.items():
        got = exported.get(name)
        if got != value:
            raise CoreMismatch(f"{module} was built for another layout: its {name} is "
                               f"{got}, the Python layout's is {value} (rebuild it: "
                               f"pip install -e ., or set SHIMMY_PURE_PYTHON=1)")


def _declares(cls: type, name: str) -> bool:
    """Whether instances of ``cls`` have ``name``: a class attribute, or an instance attribute
    declared by an annotation in the class body (the C module reads those off the instance)."""
    return hasattr(cls, name) or any(name in vars(k).get("__annotations__", {})
                                     for k in cls.__mro__)


def check_lookups(lookups: dict[str, tuple[str, ...]], classes: dict[str, type]) -> None:
    """Raise CoreMismatch unless every attribute the C module looks up by name (``lookups``, by
    the role of the object it is looked up on) exists on the Python class in that role."""
    for role, cls in classes.items():
        for name in lookups[role]:
            if not _declares(cls, name):
                raise CoreMismatch(f"shimmy._ringcore looks up {name!r} on {cls.__name__} "
                                   f"({role}), which has no such attribute: rename it on both "
                                   f"sides (shimmy/_ringcore.c, PyInit__ringcore)")


def core_layout() -> dict[str, int]:
    """The C module's exported layout constants (empty when it is not loaded)."""
    if _core is None:
        return {}
    return {k: v for k, v in vars(_core).items() if isinstance(v, int) and k.isupper()}
