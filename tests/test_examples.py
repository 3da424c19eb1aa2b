"""The runnable examples run, against a real daemon, and say they succeeded."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_example(daemon, *args):
    env = dict(os.environ, SHIMMY_DAEMON=daemon.socket)
    return subprocess.run([sys.executable, os.path.join(ROOT, "examples", args[0]), *args[1:]],
                          env=env, capture_output=True, text=True, timeout=120)


def test_sensor_pubsub(daemon):
    r = run_example(daemon, "sensor_pubsub.py")
    assert r.returncode == 0, r.stderr
    assert "dashboard: 1000 readings, mean 20.45 C, last seq 999" in r.stdout


def test_stream_copy(daemon, tmp_path):
    src, dst = tmp_path / "in.bin", tmp_path / "out.bin"
    src.write_bytes(os.urandom(5 << 20))
    r = run_example(daemon, "stream_copy.py", str(src), str(dst))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "identical" in r.stdout and dst.read_bytes() == src.read_bytes()
