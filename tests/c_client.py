"""Where the C client's build lives, and the marks for tests that need it (tests/test_c_*.py).

``make c`` (which ``make test`` runs) builds libshimmy/build (plain) and libshimmy/build-asan
(AddressSanitizer + UBSan); without it these tests skip and say so.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from shimmy.protocol import PROTOCOL_VERSION

ROOT = Path(__file__).resolve().parent.parent
BUILD = ROOT / "libshimmy" / "build"
ASAN = ROOT / "libshimmy" / "build-asan"
SHIMMY_C = BUILD / "shimmy-c"
SHIMMY_C_ASAN = ASAN / "shimmy-c"

needs_c = pytest.mark.skipif(
    not SHIMMY_C.exists(),
    reason="libshimmy is not built: run `make c` (needs gcc and libmsgpack-dev, which it "
           "installs as root); `make test` builds it first")

# libshimmy speaks control protocol v2 (length-prefixed msgpack over a unix stream socket).
needs_v2 = pytest.mark.skipif(
    PROTOCOL_VERSION != 2,
    reason=f"this daemon speaks control protocol v{PROTOCOL_VERSION}; libshimmy speaks v2")


def run(*args: str, asan: bool = False, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run shimmy-c (the sanitized build with ``asan``) to its end, output captured."""
    exe = SHIMMY_C_ASAN if asan else SHIMMY_C
    return subprocess.run([str(exe), *args], capture_output=True, text=True, timeout=timeout,
                          **kw)


def start(*args: str, asan: bool = False, **kw) -> subprocess.Popen:
    exe = SHIMMY_C_ASAN if asan else SHIMMY_C
    return subprocess.Popen([str(exe), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)
