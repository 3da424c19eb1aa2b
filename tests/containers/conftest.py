"""Fixtures for the real-container tests (``-m container``); helpers live in ctrkit.py."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from ctrkit import APP_IMAGE, DAEMON_IMAGE, DOCKER, Containers, _unavailable, docker


@pytest.fixture(scope="session")
def engine() -> None:
    if shutil.which(DOCKER) is None:
        _unavailable("no docker CLI on PATH (run .ci/containers.sh)")
    try:
        r = subprocess.run([DOCKER, "info", "--format", "{{.ServerVersion}}"],
                           capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        _unavailable("docker engine did not answer within 20 s")
    if r.returncode != 0:
        _unavailable(f"no docker engine reachable: {r.stderr.strip()[:200]}")
    for image in (DAEMON_IMAGE, APP_IMAGE):
        if docker("image", "inspect", image, check=False).returncode != 0:
            _unavailable(f"image {image} not built (run .ci/containers.sh)")


@pytest.fixture
def containers(engine, request) -> Iterator[Containers]:
    test = re.sub(r"[^a-z0-9]+", "-", request.node.name.lower().removeprefix("test_"))[:24]
    c = Containers(test.strip("-"))
    tmp = tempfile.mkdtemp(prefix=f"shimmy-ci-{c.test}-",
                           dir=os.environ.get("SHIMMY_TEST_WORK") or None)
    c.rundir = Path(tmp) / "run"
    c.rundir.mkdir()
    # the daemon and apps run as uid 10001: the bind-mounted control dir must be writable
    os.chmod(c.rundir, 0o777)
    try:
        yield c
    finally:
        if getattr(request.node, "rep_call_failed", False):
            for n in c.names:
                print(f"----- logs of {n}\n{c.logs(n)[-4000:]}")
        c.remove_all()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.when == "call":
        item.rep_call_failed = rep.failed


@pytest.fixture
def tmpfs_dir():
    """A fresh tmpfs mounted on the host (root only): the model of a node's shm directory
    (Kubernetes hostPath), which outlives the daemon container."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    d = tempfile.mkdtemp(prefix="shimmy-ci-shm-", dir=os.environ.get("SHIMMY_TEST_WORK") or None)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m,mode=1777", "shimmy-ci-shm", d],
                       capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        os.rmdir(d)
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield Path(d)
    finally:
        subprocess.run(["umount", d], capture_output=True, timeout=30)
        os.rmdir(d)
