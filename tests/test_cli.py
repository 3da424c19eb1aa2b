"""The command line, run as a user would: real subprocesses against a real daemon."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

SHIMMY = [sys.executable, "-m", "shimmy.cli"]


def run(*args, input=None, timeout=60):
    return subprocess.run([*SHIMMY, *args], input=input, capture_output=True, text=True,
                          timeout=timeout)


def test_pub_from_stdin_reaches_sub_and_ls_shows_the_channel(daemon):
    sub = subprocess.Popen([*SHIMMY, "sub", "cli/lines", "--daemon", daemon.socket, "--count", "3",
                            "--seq"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 15
    while True:  # wait until the subscriber is attached
        ls = run("ls", "--json", "--daemon", daemon.socket)
        chans = json.loads(ls.stdout) if ls.returncode == 0 else []
        if any(c["name"] == "cli/lines" and c["subscribers"] for c in chans):
            break
        assert time.monotonic() < deadline, ls.stderr
        time.sleep(0.1)
    pub = run("pub", "cli/lines", "--daemon", daemon.socket, input="one\ntwo\nthree\n")
    assert pub.returncode == 0, pub.stderr
    out, err = sub.communicate(timeout=30)
    assert sub.returncode == 0, err
    assert out.splitlines() == ["0\tone", "1\ttwo", "2\tthree"]
    table = run("ls", "--daemon", daemon.socket)
    assert table.returncode == 0 and "cli/lines" in table.stdout and "reliable" in table.stdout
    stat = json.loads(run("stat", "--daemon", daemon.socket).stdout)
    assert stat["counters"]["requests"] > 0 and stat["pid"] == daemon.proc.pid


def test_health_and_rm(daemon):
    assert run("pub", "cli/rm", "x", "--daemon", daemon.socket).returncode == 0
    assert run("health", "--daemon", daemon.socket).returncode == 0
    assert run("rm", "cli/rm", "--daemon", daemon.socket).returncode == 0
    gone = run("rm", "cli/rm", "--daemon", daemon.socket)
    assert gone.returncode == 2 and "does not exist" in gone.stderr


def test_errors_are_one_clear_line(daemon, tmp_path):
    bad = run("pub", "no good", "x", "--daemon", daemon.socket)
    assert bad.returncode == 2 and bad.stderr.startswith("shimmy: InvalidName:")
    missing = run("ls", "--daemon", str(tmp_path / "none.sock"))
    assert missing.returncode == 2 and "shimmy daemon --socket" in missing.stderr
    assert run("health", "--daemon", str(tmp_path / "none.sock"), "--timeout", "0.5").returncode == 1


def test_demo_runs_end_to_end_and_cleans_up():
    from shimmy.daemon.segments import daemon_id
    r = run("demo", "--seconds", "1", timeout=180)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "messages/s per subscriber" in r.stdout and "zeromq ipc" in r.stdout
    assert re.search(r"all messages delivered\s+True", r.stdout), r.stdout
    sock = re.search(r"embedded daemon at (\S+);", r.stdout).group(1)
    assert not os.path.exists(os.path.dirname(sock)), "the demo's temporary directory is gone"
    prefix = f"shimmy.{daemon_id(sock)}."
    assert not [e for e in os.listdir("/dev/shm") if e.startswith((prefix, "sem." + prefix))]


def test_ls_lists_streams_with_their_ends(daemon):
    import shimmy
    w = shimmy.Stream("cli/bytes", daemon=daemon.socket).writer()
    w.write(b"x" * 1000)
    table = run("ls", "--daemon", daemon.socket)
    assert table.returncode == 0, table.stderr
    line = next(ln for ln in table.stdout.splitlines() if ln.startswith("cli/bytes"))
    assert f"pid {os.getpid()}" in line and "1000B" in line
    w.close()
