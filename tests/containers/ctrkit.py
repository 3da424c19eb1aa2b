"""Helpers for the real-container tests (``-m container``): docker CLI calls, container tracking.

They drive the docker CLI (and the Compose v2 binary) with subprocess, every call bounded by a
timeout. Images come from ``.ci/containers.sh`` (env ``SHIMMY_TEST_DAEMON_IMAGE``,
``SHIMMY_TEST_APP_IMAGE``); without a reachable engine or the images
the tests are skipped with the reason, unless ``SHIMMY_TEST_REQUIRE_DOCKER=1`` (set by the CI
script), where that is a failure.

Every container is named ``shimmy-ci-<test>-<run>`` before it is started, carries the labels
``shimmy.ci=1`` and ``shimmy.test.run=<run>``, runs with ``--network host`` (the engine has no
bridge; nothing listens beyond unix sockets and 127.0.0.1) and is removed at the end of its test.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN_ID = uuid.uuid4().hex[:8]
DAEMON_IMAGE = os.environ.get("SHIMMY_TEST_DAEMON_IMAGE", "shimmy-ci-daemon:test")
APP_IMAGE = os.environ.get("SHIMMY_TEST_APP_IMAGE", "shimmy-ci-app:test")
REQUIRE = os.environ.get("SHIMMY_TEST_REQUIRE_DOCKER") == "1"
DOCKER = os.environ.get("DOCKER", "docker")
SOCKET = "/run/shimmy/shimmyd.sock"


def _unavailable(reason: str):
    if REQUIRE:
        pytest.fail(f"{reason} (SHIMMY_TEST_REQUIRE_DOCKER=1)")
    pytest.skip(reason)


def docker(*args: str, timeout: float = 60, check: bool = True,
           input: str | None = None) -> subprocess.CompletedProcess:
    """Run the docker CLI; raise with its output on failure when ``check``."""
    r = subprocess.run([DOCKER, *args], capture_output=True, text=True, timeout=timeout,
                       input=input)
    if check and r.returncode != 0:
        raise AssertionError(f"docker {' '.join(args)} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


def wait_until(predicate, timeout: float, interval: float = 0.2, what: str = "condition"):
    """Poll ``predicate`` until it returns a truthy value (returned) or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"{what} not reached within {timeout} s (last: {last!r})")


SUMMARY = re.compile(r"^(publisher|subscriber): (sent|received)=.*$", re.M)


def summary(log: str) -> dict[str, str]:
    """The key=value pairs of the last summary line an example printed."""
    m = list(SUMMARY.finditer(log))
    assert m, f"no summary line in:\n{log[-3000:]}"
    return dict(kv.split("=", 1) for kv in m[-1].group(0).split()[1:] if "=" in kv)


@dataclass
class Containers:
    """Names, starts, inspects and removes this test's containers."""

    test: str
    names: list[str] = field(default_factory=list)
    rundir: Path | None = None

    def name(self, role: str) -> str:
        n = f"shimmy-ci-{self.test}-{role}-{RUN_ID}"
        self.names.append(n)  # tracked before `run`: a run that fails to start prints no id
        return n

    def run(self, role: str, image: str, *args: str, opts: tuple[str, ...] = (),
            env: dict[str, str] | None = None, labels: dict[str, str] | None = None,
            rundir: bool = True) -> str:
        n = self.name(role)
        cmd = ["run", "-d", "--name", n, "--network", "host",
               "--label", "shimmy.ci=1", "--label", f"shimmy.test.run={RUN_ID}"]
        for k, v in (labels or {}).items():
            cmd += ["--label", f"{k}={v}"]
        for k, v in (env or {}).items():
            cmd += ["-e", f"{k}={v}"]
        if rundir:
            cmd += ["-v", f"{self.rundir}:/run/shimmy"]
        docker(*cmd, *opts, image, *args, timeout=60)
        return n

    def daemon(self, *extra: str, role: str = "daemon", opts: tuple[str, ...] = (),
               ipc: tuple[str, ...] = ("--ipc", "shareable", "--shm-size", "256m")) -> str:
        """Start a daemon container (host pid namespace, docker socket for labels) and wait
        until ``shimmy health`` answers inside it."""
        sock_opts: tuple[str, ...] = ()
        if os.path.exists("/var/run/docker.sock"):
            gid = os.stat("/var/run/docker.sock").st_gid
            sock_opts = ("-v", "/var/run/docker.sock:/var/run/docker.sock:ro",
                         "--group-add", str(gid))
        n = self.run(role, DAEMON_IMAGE, "daemon", "--socket", SOCKET, "--shm-dir", "/dev/shm",
                     *extra, opts=(*ipc, "--pid", "host", *sock_opts, *opts))
        self.wait_healthy(n)
        return n

    def wait_healthy(self, name: str, timeout: float = 30) -> None:
        def ok():
            if not self.running(name):
                raise AssertionError(f"{name} exited:\n{self.logs(name)}")
            try:
                return docker("exec", name, "shimmy", "health", check=False,
                              timeout=15).returncode == 0
            except subprocess.TimeoutExpired:
                return False
        wait_until(ok, timeout, 0.25, f"{name} healthy")

    def app(self, role: str, daemon: str, script: str, env: dict[str, str],
            labels: dict[str, str] | None = None, shm: tuple[str, ...] | None = None) -> str:
        ipc = shm if shm is not None else ("--ipc", f"container:{daemon}")
        return self.run(role, APP_IMAGE, "python", f"/opt/shimmy-examples/{script}",
                        env=env, labels=labels, opts=ipc)

    def running(self, name: str) -> bool:
        r = docker("inspect", "-f", "{{.State.Running}}", name, check=False, timeout=30)
        return r.stdout.strip() == "true"

    def exit_code(self, name: str, timeout: float) -> int:
        r = docker("wait", name, timeout=timeout + 10, check=False)
        if r.returncode != 0 or not r.stdout.strip():
            raise AssertionError(f"docker wait {name}: {r.stderr}")
        return int(r.stdout.strip())

    def wait_exit(self, name: str, timeout: float) -> int:
        wait_until(lambda: not self.running(name), timeout, 0.25, f"{name} exited")
        return int(docker("inspect", "-f", "{{.State.ExitCode}}", name).stdout.strip())

    def logs(self, name: str) -> str:
        r = docker("logs", name, check=False, timeout=30)
        return r.stdout + r.stderr

    def stat(self, daemon: str) -> dict:
        """``shimmy stat`` (JSON) run inside the daemon container."""
        r = docker("exec", daemon, "shimmy", "stat", "--json", check=False, timeout=30)
        if r.returncode != 0:  # a CLI whose stat prints JSON without --json
            r = docker("exec", daemon, "shimmy", "stat", timeout=30)
        return json.loads(r.stdout)

    def remove_all(self) -> None:
        for n in reversed(self.names):
            docker("rm", "-f", "-v", n, check=False, timeout=60)
        # anything of this run that slipped through (labels are set at create time)
        left = docker("ps", "-aq", "--filter", f"label=shimmy.test.run={RUN_ID}",
                      check=False).stdout.split()
        for cid in left:
            docker("rm", "-f", "-v", cid, check=False, timeout=60)


