"""`shimmy bench --quick --report DIR` end to end: the report files exist, every installed peer
is named in them, the PNGs are real PNGs, and nothing (workers, redis-server) is left running.

No speed assertions: numbers on a shared CI machine mean nothing (docs/benchmarks.md).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib")


def _installed(module: str) -> bool:
    try:
        __import__(module)
    except Exception:
        return False
    return True


def _children_named(pid: int, needle: str) -> list[str]:
    """Command lines of the live descendants of ``pid`` containing ``needle``."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and needle in cmd:
            out.append(cmd)
    return out


@pytest.mark.timeout(420)   # a smoke run of every suite: ~20 s idle, minutes on a loaded machine
def test_bench_quick_report_names_every_installed_peer(tmp_path):
    report_dir = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, "-m", "shimmy.cli", "bench", "--quick", "--seconds", "0.03",
         "--sizes", "64,4k", "--quiet", "--report", str(report_dir)],
        capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not _children_named(os.getpid(), "redis-server")

    names = {p.name for p in report_dir.iterdir()}
    assert {"results.json", "report.md", "latency-p50.png", "latency-p99.png", "throughput.png",
            "fanout.png"} <= names
    for png in (n for n in names if n.endswith(".png")):
        assert (report_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png

    data = json.loads((report_dir / "results.json").read_text())
    assert data["meta"]["command"].startswith("shimmy bench --quick")
    for key in ("cpu_model", "cpu_count", "kernel", "python", "versions"):
        assert data["meta"].get(key), key
    md = (report_dir / "report.md").read_text()
    assert data["meta"]["command"] in md
    assert "CPU µs/msg" in md and "shimmy's advantage" in md

    peers = ["ZeroMQ ipc", "ZeroMQ tcp", "raw TCP", "UDP 127.0.0.1", "unix socket",
             "os.pipe (FIFO)"]
    if _installed("iceoryx2"):
        peers.append("iceoryx2")
    if shutil.which("redis-server") and _installed("redis"):
        peers.append("Redis pub/sub")
    else:
        assert "redis" in data["skipped"]
    for peer in peers:
        assert peer in md, f"{peer} missing from report.md"
    ratios = {r["peer"] for r in data["ratios"]}
    for peer in peers:
        assert any(peer in r for r in ratios), f"no ratio of shimmy to {peer}"
    for suite in ("pingpong", "throughput", "fanout"):
        assert not data["suites"][suite]["failed"], (suite, data["suites"][suite]["failed"])
