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


# -- shimmy-c's message and stream patterns (`shimmy-c --help`), from Python -------------------
_TILE = bytes(range(251)) * 2


def size_of(index: int, size: int, mixed: bool = True) -> int:
    """Message ``index``'s size as ``shimmy-c pub --size SIZE [--mixed]`` makes it."""
    return 8 + (index * 2654435761) % (size - 7) if mixed else size


def payload(index: int, n: int) -> bytes:
    """Bytes 0-7 the index (little-endian u64), byte k >= 8 is (index + k) % 251."""
    out = bytearray(index.to_bytes(8, "little"))
    k, start = 8, (index + 8) % 251
    while k < n:
        take = min(n - k, 251)
        out += _TILE[start:start + take]
        k += take
        start = (start + take) % 251
    return bytes(out)


def check(data) -> int:
    """The index of a message in shimmy-c's pattern; AssertionError naming a torn byte."""
    data = bytes(data)
    index = int.from_bytes(data[:8], "little")
    want = payload(index, len(data))
    if data != want:
        k = next(i for i in range(len(data)) if data[i] != want[i])
        raise AssertionError(f"message #{index} ({len(data)} bytes) byte {k} is {data[k]}, "
                             f"expected {want[k]}")
    return index


_PERIOD = 509 * 251   # (i + i // 509) % 251 repeats with this period
_STREAM = bytes((i + i // 509) % 251 for i in range(_PERIOD)) * 2


def stream_bytes(start: int, n: int) -> bytes:
    """Bytes start..start+n of ``shimmy-c stream-write``: byte i is (i + i // 509) % 251."""
    out = bytearray()
    while n:
        at = start % _PERIOD
        take = min(n, _PERIOD)
        out += _STREAM[at:at + take]
        start += take
        n -= take
    return bytes(out)


def wait_file(path, proc: subprocess.Popen | None = None, timeout: float = 20.0) -> None:
    """Wait for ``--ready`` FILE (a subscriber subscribed), failing early if ``proc`` died."""
    import os
    import time
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"shimmy-c exited {proc.returncode}: {proc.communicate()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{path} did not appear within {timeout} s")
        time.sleep(0.01)
