"""The conformance vectors (spec/vectors: ring, group, stream and control-frame cases) against
the C client through shimmy-c's command contract, plain and under AddressSanitizer + UBSan."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.c_client import ROOT, SHIMMY_C, SHIMMY_C_ASAN, needs_c

RUNNER = ROOT / "spec" / "vectors" / "run.py"

pytestmark = [needs_c, pytest.mark.skipif(not RUNNER.exists(),
                                          reason="no conformance vectors (spec/vectors) here")]


@pytest.mark.parametrize("exe", [SHIMMY_C, SHIMMY_C_ASAN], ids=["plain", "asan+ubsan"])
def test_vectors(exe):
    if not exe.exists():
        pytest.skip(f"{exe} is not built: run `make c`")
    out = subprocess.run([sys.executable, str(RUNNER), "--client", str(exe), "-v"],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "FAIL" not in out.stdout
