"""Smoke test for `shimmy bench`: it runs, cleans up, and writes JSON with the documented keys.

No speed assertions: numbers on a shared CI machine mean nothing; docs/benchmarks.md explains
how to read a real run.
"""

from __future__ import annotations

import json
import subprocess
import sys


def test_bench_quick_pingpong_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "shimmy.cli", "bench", "--quick", "--only", "pingpong",
         "--sizes", "64", "--seconds", "0.02", "--reps", "1", "--quiet", "--json", str(out)],
        capture_output=True, text=True, timeout=110)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "TARGETS" in proc.stdout
    data = json.loads(out.read_text())
    assert {"meta", "suites", "skipped", "targets"} <= set(data)
    assert data["meta"]["usable_cpus"]
    pp = data["suites"]["pingpong"]
    assert not pp["failed"], pp["failed"]
    rows = {(r["transport"], r["variant"]) for r in pp["results"]}
    assert {("shimmy", "default"), ("shimmy", "spin0"), ("zmq-ipc", "PAIR"), ("tcp", "raw")} <= rows
    for r in pp["results"]:
        assert r["size"] == 64
        for key in ("p50_us", "p99_us", "p999_us", "cpu_us_per_rt_client", "cpu_us_per_rt_server"):
            assert r[key] > 0, (r["label"], key)
    ids = {t["id"] for t in data["targets"]}
    assert {"rtt64-vs-zmq", "rtt64-vs-iceoryx2", "rtt64-spin0-vs-zmq"} <= ids
    for t in data["targets"]:
        assert t["status"] in ("PASS", "MISS", "SKIP")
