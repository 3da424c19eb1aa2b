"""The conformance vectors (spec/vectors/README.md) against the Python paths.

Every vector runs through the real runner (``spec/vectors/run.py``) and the Python client
(``python -m shimmy.conform``), with the C paths and with the Python twins
(``SHIMMY_PURE_PYTHON=1``), over each of the SDK's read paths.  The committed vectors must be
exactly what ``spec/vectors/generate.py`` writes today (the frozen-vector rule): a change to a
format that does not come with a new version directory fails here.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys

import pytest

from shimmy import ring
from shimmy.protocol import PROTOCOL_VERSION

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VECTORS = os.path.join(ROOT, "spec", "vectors")
RUNNER = os.path.join(VECTORS, "run.py")
GENERATOR = os.path.join(VECTORS, "generate.py")
MODES = ["c", "python"]


def env_for(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "SHIMMY_PURE_PYTHON"}
    if mode == "python":
        env["SHIMMY_PURE_PYTHON"] = "1"
    return env


def need(mode: str) -> None:
    if mode == "c" and not ring.ACCELERATED:
        pytest.skip("the C extension is not built here: the C paths cannot run")


def run(args: list[str], mode: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          env=env_for(mode), cwd=ROOT, timeout=timeout)


def client(path: str) -> str:
    return f"{sys.executable} -m shimmy.conform --path {path}"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("path", ["view", "copy", "batch"])
def test_python_client_passes_every_vector(mode, path):
    need(mode)
    args = [RUNNER, "--client", client(path)] + (["--batch-reads"] if path == "batch" else [])
    out = run(args, mode)
    assert out.returncode == 0, out.stdout + out.stderr
    last = out.stdout.strip().splitlines()[-1]
    passed, _, total = last.split()[:3]
    assert passed == total and int(total) >= 90, last   # every case ran, every case passed


@pytest.mark.parametrize("mode", MODES)
def test_committed_vectors_are_what_the_generator_writes(mode, tmp_path):
    """The frozen-vector rule: the files in spec/vectors equal a fresh generation, byte for
    byte, with either version of the ring paths."""
    need(mode)
    out = run([GENERATOR, "--out", str(tmp_path)], mode)
    assert out.returncode == 0, out.stderr
    for kind_dir in sorted(os.listdir(tmp_path)):
        for version in sorted(os.listdir(tmp_path / kind_dir)):
            fresh = tmp_path / kind_dir / version
            committed = os.path.join(VECTORS, kind_dir, version)
            names = sorted(os.listdir(fresh))
            assert sorted(os.listdir(committed)) == names, f"{kind_dir}/{version}: file sets"
            match, mismatch, errors = filecmp.cmpfiles(fresh, committed, names, shallow=False)
            assert not mismatch and not errors, (
                f"{kind_dir}/{version}: {mismatch + errors} differ from what generate.py "
                f"writes now: a released format's vectors are frozen (spec/vectors/README.md); "
                f"a format change needs a new version directory")


def test_runner_fails_a_client_that_reads_or_writes_wrong(tmp_path):
    """The runner can fail: vectors whose expectations were altered (a payload, a lost count,
    a byte of an expected image, a reply field) are reported, each by its case."""
    vectors = tmp_path / "vectors"
    shutil.copytree(VECTORS, vectors, ignore=shutil.ignore_patterns("*.py", "*.md"))
    cases_path = vectors / "ring" / "v2" / "cases.json"
    doc = json.loads(cases_path.read_text())
    by_name = {c["name"]: c for c in doc["cases"]}
    by_name["three"]["read"][0]["expect"][1]["data"] = "ff"
    by_name["lossy-lapped"]["read"][0]["expect"][0]["lost"] += 1
    cases_path.write_text(json.dumps(doc))
    after = vectors / "ring" / "v2" / by_name["empty"]["write"]["image"]
    data = bytearray(after.read_bytes())
    data[ring.OFF_TAIL] ^= 0x10
    after.write_bytes(bytes(data))
    control = vectors / "control" / "v2" / "cases.json"
    cdoc = json.loads(control.read_text())
    decode = next(c for c in cdoc["cases"] if c["name"] == "decode-replies")
    decode["expect"][0]["reply"]["protocol"] = 3
    control.write_text(json.dumps(cdoc))
    out = run([RUNNER, "--vectors", str(vectors), "--client", client("view")], "python")
    assert out.returncode == 1, out.stdout
    failed = {line.split()[1] for line in out.stdout.splitlines() if line.startswith("FAIL")}
    assert failed == {"ring/three", "ring/lossy-lapped", "ring/empty", "control/decode-replies"}, \
        out.stdout


def test_pure_python_paths_refuse_a_weakly_ordered_machine():
    """spec/README.md, "What runs where": the Python ring paths rely on x86-64's store order;
    on another architecture mapping a segment is refused, naming the machine and the rule."""
    ring.check_architecture("x86_64")
    ring.check_architecture("AMD64")
    for machine in ("aarch64", "arm64", "riscv64", "ppc64le"):
        with pytest.raises(ring.UnsupportedPlatform) as exc:
            ring.check_architecture(machine)
        text = str(exc.value)
        assert machine in text and "x86-64" in text and "spec/README.md" in text


@pytest.mark.skipif(PROTOCOL_VERSION < 2, reason="the control vectors are of protocol v2; this "
                    "tree's daemon speaks v1 (the v2 listener lands with the transport change)")
def test_daemon_answers_the_control_vectors(daemon):
    """Every control case replayed against a real daemon: the identity-free requests each on a
    connection of its own (refused frames close it), then a whole session's requests."""
    out = run([RUNNER, "--daemon", daemon.socket, "-v"], "python", timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "FAIL" not in out.stdout and "daemon/session" in out.stdout, out.stdout
