"""Shared fixtures: a real daemon process per test, and leak checks on /dev/shm."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from shimmy.daemon.segments import daemon_id

SHM_DIR = "/dev/shm"


class DaemonProcess:
    """A real ``shimmy daemon`` subprocess on a private socket."""

    def __init__(self, directory: str, *extra: str, env: dict | None = None):
        self.dir = directory
        self.socket = os.path.join(directory, "shimmyd.sock")
        self.log_path = os.path.join(directory, "daemon.log")
        self.prefix = f"shimmy.{daemon_id(self.socket)}."
        self.extra = extra
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 15.0) -> "DaemonProcess":
        before = self.log().count("daemon ready")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shimmy.cli", "daemon", "--socket", self.socket, *self.extra],
            stdout=log, stderr=subprocess.STDOUT, env=self.env)
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            if self.log().count("daemon ready") > before:
                return self
            time.sleep(0.02)
        raise RuntimeError(f"daemon did not start within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        try:
            with open(self.log_path) as fh:
                return fh.read()
        except FileNotFoundError:
            return ""

    def shm_objects(self) -> list[str]:
        return sorted(e for e in os.listdir(SHM_DIR)
                      if e.startswith(self.prefix) or e.startswith("sem." + self.prefix))

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout)

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


@pytest.fixture
def daemon_factory():
    """Start daemons on demand; stop them all and check they left nothing in /dev/shm."""
    started: list[DaemonProcess] = []
    dirs: list[tempfile.TemporaryDirectory] = []

    def make(*extra: str, directory: str | None = None, start: bool = True) -> DaemonProcess:
        if directory is None:
            tmp = tempfile.TemporaryDirectory(prefix="shimmy-test-")
            dirs.append(tmp)
            directory = tmp.name
        d = DaemonProcess(directory, *extra)
        if start:
            try:
                d.start()
            except RuntimeError:
                d.stop()
                raise
        started.append(d)
        return d

    yield make
    leaks = []
    for d in started:
        code = d.stop()
        if code not in (0, None, -signal.SIGKILL):
            leaks.append(f"daemon exited with {code}:\n{d.log()[-2000:]}")
        left = d.shm_objects()
        if left:
            leaks.append(f"daemon {d.socket} left shared memory behind: {left}")
    for tmp in dirs:
        tmp.cleanup()
    assert not leaks, "\n".join(leaks)


@pytest.fixture
def daemon(daemon_factory) -> DaemonProcess:
    """One running daemon; its socket path is ``daemon.socket``."""
    return daemon_factory()
