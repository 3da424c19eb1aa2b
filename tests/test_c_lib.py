"""libshimmy's own test binary (libshimmy/tests/test_ring.c: wraps and PADs, back-pressure, lossy
lapping with exact loss counts, batches, loans, a successor rolling a commit forward, validation,
two threads exchanging 300,000 checksummed messages), plain and under AddressSanitizer + UBSan;
and shimmy-c's command-line contract where no daemon is needed."""

from __future__ import annotations

import subprocess

import pytest

from tests.c_client import ASAN, BUILD, needs_c, needs_v2, run, start, wait_file


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


@needs_c
@needs_v2
def test_sanitized_client_end_to_end(daemon, tmp_path):
    """The AddressSanitizer + UBSan build of shimmy-c (leak checks included) through a real
    daemon: every publish and receive path, lossy, a publisher group, a stream."""
    sock = daemon.socket
    cases = [
        (["--mode", "reliable"], ["--receive", "view"], []),
        (["--mode", "reliable"], ["--receive", "copy"], ["--batch", "32"]),
        (["--mode", "lossy"], ["--receive", "many"], ["--loan"]),
        (["--max-publishers", "3"], ["--receive", "view"], []),
    ]
    for n, (opts, receive, how) in enumerate(cases):
        name = f"asan/{n}"
        ready = tmp_path / f"ready{n}"
        common = ["--daemon", sock, "--size", "1500", "--mixed", "--capacity", "32768", *opts]
        pubs = 2 if "--max-publishers" in opts else 1
        sub = start("sub", *common, "--count", str(20000 * pubs), *receive, "--ready",
                    str(ready), name, asan=True)
        wait_file(ready, sub)
        for p in [start("pub", *common, "--count", "20000", *how, name, asan=True)
                  for _ in range(pubs)]:
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, out + err
        out, err = sub.communicate(timeout=300)
        assert sub.returncode == 0, out + err
        assert out.startswith(f"received {20000 * pubs if 'lossy' not in opts else ''}"), out
        assert "ERROR: AddressSanitizer" not in err and "runtime error" not in err, err
    ready = tmp_path / "ready-stream"
    reader = start("stream-read", "--daemon", sock, "--size", "3000000", "--capacity", "65536",
                   "--ready", str(ready), "asan/stream", asan=True)
    wait_file(ready, reader)
    writer = start("stream-write", "--daemon", sock, "--size", "3000000", "--chunk", "10007",
                   "--capacity", "65536", "asan/stream", asan=True)
    for proc in (writer, reader):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "AddressSanitizer" not in err, out + err
    assert out.strip() == "read 3000000 bytes in order"
