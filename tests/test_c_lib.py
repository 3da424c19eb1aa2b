"""libshimmy's own test binary (libshimmy/tests/test_ring.c: wraps and PADs, back-pressure, lossy
lapping with exact loss counts, batches, loans, a successor rolling a commit forward, validation,
two threads exchanging 300,000 checksummed messages), plain and under AddressSanitizer + UBSan;
and shimmy-c's command-line contract where no daemon is needed."""

from __future__ import annotations

import subprocess

import pytest

from tests.c_client import ASAN, BUILD, needs_c, run


@needs_c
@pytest.mark.parametrize("build", [BUILD, ASAN], ids=["plain", "asan+ubsan"])
def test_ring_paths(build):
    exe = build / "test_ring"
    if not exe.exists():
        pytest.skip(f"{exe} is not built: run `make c`")
    out = subprocess.run([str(exe)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "all checks passed" in out.stdout
    assert "runtime error" not in out.stderr    # UBSan reports (fatal anyway: no recover)


@needs_c
def test_help_and_bad_arguments():
    out = run("--help")
    assert out.returncode == 0 and "shimmy-c pub" not in out.stderr
    assert "(index + k) % 251" in out.stdout
    bad = run("pub", "--count", "x", "chan")
    assert bad.returncode == 2 and "--count needs a non-negative integer, got 'x'" in bad.stderr
    small = run("pub", "--count", "1", "--size", "4", "--daemon", "/nonexistent", "chan")
    assert small.returncode == 2 and "--size must be at least 8" in small.stderr
    gone = run("sub", "--count", "1", "--daemon", "/nonexistent/shimmyd.sock", "chan")
    assert gone.returncode == 1
    assert "shimmy daemon not reachable at /nonexistent/shimmyd.sock (no socket file there)" \
        in gone.stderr and "(daemon_unavailable)" in gone.stderr
    assert "Traceback" not in gone.stderr
