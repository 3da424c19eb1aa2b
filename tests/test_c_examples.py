"""examples/c: the C publisher and subscriber against a real daemon, with each other and with
the compose example's Python publisher (the pipeline deploy/compose/compose.c.yaml runs in
containers)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.c_client import BUILD, ROOT, needs_c, needs_v2, wait_file

pytestmark = [needs_c, needs_v2]
PUB, SUB = BUILD / "examples" / "publisher", BUILD / "examples" / "subscriber"


def _env(daemon, **extra: str) -> dict:
    return {**os.environ, "SHIMMY_DAEMON": daemon.socket, **extra}


def test_c_publisher_to_c_subscriber(daemon, tmp_path):
    ready = tmp_path / "ready"
    sub = subprocess.Popen([str(SUB), "ex/c", "20000", str(ready)], env=_env(daemon),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_file(ready, sub)
    pub = subprocess.run([str(PUB), "ex/c", "20000", "300"], env=_env(daemon),
                         capture_output=True, text=True, timeout=60)
    assert pub.returncode == 0 and "c-publisher: sent=20000 channel=ex/c size=300" in pub.stdout
    out, err = sub.communicate(timeout=60)
    assert sub.returncode == 0, out + err
    assert "c-subscriber: received=20000 expected=20000 out_of_order=0 bytes=6000000 lost=0" \
        in out


def test_python_compose_publisher_to_c_subscriber(daemon, tmp_path):
    """The compose example's Python publisher, and the C subscriber beside its Python one."""
    ready = tmp_path / "ready"
    sub = subprocess.Popen([str(SUB), "demo/compose", "5000", str(ready)], env=_env(daemon),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_file(ready, sub)
    pub = subprocess.run([sys.executable, str(ROOT / "examples" / "compose_publisher.py")],
                         env=_env(daemon, SHIMMY_COUNT="5000", SHIMMY_SIZE="256"),
                         capture_output=True, text=True, timeout=120)
    assert pub.returncode == 0, pub.stdout + pub.stderr
    out, err = sub.communicate(timeout=60)
    assert sub.returncode == 0, out + err
    assert "received=5000 expected=5000 out_of_order=0 bytes=1280000 lost=0" in out


def test_shared_library_and_cpp_wrapper(daemon, tmp_path):
    """An application linked with libshimmy.so, and the header-only C++ wrapper (shimmy.hpp)."""
    lib, inc = BUILD, ROOT / "libshimmy" / "include"
    exe = tmp_path / "pub-dyn"
    subprocess.run(["cc", f"-I{inc}", str(ROOT / "examples" / "c" / "publisher.c"), f"-L{lib}",
                    "-lshimmy", "-o", str(exe)], check=True, timeout=120)
    env = _env(daemon, LD_LIBRARY_PATH=str(lib))
    out = subprocess.run([str(exe), "dyn/c", "100", "64"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "c-publisher: sent=100" in out.stdout, out.stdout + out.stderr
    if shutil.which("c++") is None:
        pytest.skip("no C++ compiler (c++) for the wrapper's test")
    cpp = tmp_path / "test_cpp"
    subprocess.run(["c++", "-std=c++17", "-Wall", "-Wextra", "-Werror", f"-I{inc}",
                    str(ROOT / "libshimmy" / "tests" / "test_cpp.cpp"), f"-L{lib}", "-lshimmy",
                    "-o", str(cpp)], check=True, timeout=180)
    out = subprocess.run([str(cpp)], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "cpp: ok", out.stdout + out.stderr
