"""The command line, run as a user would: real subprocesses against a real daemon.

Every run also checks that no Python traceback reached the user (``run`` asserts it).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

SHIMMY = [sys.executable, "-m", "shimmy.cli"]


def run(*args, input=None, timeout=60, text=True, **kw):
    r = subprocess.run([*SHIMMY, *args], input=input, capture_output=True, text=text,
                       timeout=timeout, **kw)
    err = r.stderr if text else r.stderr.decode(errors="replace")
    assert "Traceback" not in err, err
    return r


def channels(daemon) -> dict:
    r = run("ls", "--json", "--daemon", daemon.socket)
    assert r.returncode == 0, r.stderr
    return {c["name"]: c for c in json.loads(r.stdout)}


def stat_json(daemon) -> dict:
    r = run("stat", "--json", "--daemon", daemon.socket)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def wait_for(predicate, what: str, limit: float = 15.0):
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


# -- the basic round trip -------------------------------------------------------------------------
def test_pub_from_stdin_reaches_sub_and_ls_shows_the_channel(daemon):
    sub = subprocess.Popen([*SHIMMY, "sub", "cli/lines", "--daemon", daemon.socket, "--count", "3",
                            "--seq"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: channels(daemon).get("cli/lines", {}).get("subscribers"), "the subscriber")
    pub = run("pub", "cli/lines", "--daemon", daemon.socket, input="one\ntwo\nthree\n")
    assert pub.returncode == 0, pub.stderr
    out, err = sub.communicate(timeout=30)
    assert sub.returncode == 0, err
    assert "Traceback" not in err
    assert out.splitlines() == ["0\tone", "1\ttwo", "2\tthree"]
    table = run("ls", "--daemon", daemon.socket)
    assert table.returncode == 0 and "cli/lines" in table.stdout and "reliable" in table.stdout
    stat = stat_json(daemon)
    assert stat["counters"]["requests"] > 0 and stat["pid"] == daemon.proc.pid


def test_health_and_rm(daemon):
    assert run("pub", "cli/rm", "x", "--daemon", daemon.socket).returncode == 0
    ok = run("health", "--daemon", daemon.socket)
    assert ok.returncode == 0 and ok.stdout.startswith(f"ok pid={daemon.proc.pid} ")
    assert run("rm", "cli/rm", "--daemon", daemon.socket).returncode == 0
    gone = run("rm", "cli/rm", "--daemon", daemon.socket)
    assert gone.returncode == 1 and "does not exist" in gone.stderr


def test_errors_are_one_clear_line(daemon, tmp_path):
    bad = run("pub", "no good", "x", "--daemon", daemon.socket)
    assert bad.returncode == 2 and bad.stderr.startswith("shimmy: InvalidName:")
    assert len(bad.stderr.strip().splitlines()) == 1
    missing = run("ls", "--daemon", str(tmp_path / "none.sock"))
    assert missing.returncode == 1 and "shimmy daemon --socket" in missing.stderr
    # No socket file: refused at once by the file check (the message says so), not after the
    # reply timeout, which would say "no reply".
    health = run("health", "--daemon", str(tmp_path / "none.sock"), "--timeout", "30")
    assert health.returncode == 1 and "no socket file" in health.stderr, health.stderr


def test_version_and_help_on_every_option():
    v = run("--version")
    from shimmy import ring
    paths = "C" if ring.ACCELERATED else "Python"
    assert v.returncode == 0 and v.stdout.startswith(f"shimmy 0.1.0 (ring paths: {paths}")
    import click

    from shimmy.cli import cli
    missing = []
    for name, command in cli.commands.items():
        assert command.get_short_help_str(), name
        for param in command.params:
            if isinstance(param, click.Option) and not param.help:
                missing.append(f"{name} {param.opts[0]}")
    assert not missing, f"options without help text: {missing}"
    for name in cli.commands:
        h = run(name, "--help")
        assert h.returncode == 0 and "usage" in h.stdout.lower(), (name, h.stdout)


def test_daemon_flags_are_generated_from_settings(daemon_factory):
    import dataclasses

    from shimmy.daemon.config import Settings
    h = run("daemon", "--help")
    for f in dataclasses.fields(Settings):
        assert "--" + f.name.replace("_", "-") in h.stdout, f.name
        assert f.metadata.get("help"), f"setting {f.name} has no help text"
    bad = run("daemon", "--max-channels", "lots")
    assert bad.returncode == 2 and "--max-channels" in bad.stderr
    invalid = run("daemon", "--max-channels", "0", "--socket", "/tmp/never-used.sock")
    assert invalid.returncode == 2 and "max_channels must be >= 1" in invalid.stderr
    d = daemon_factory("--max-channels", "1")
    assert run("pub", "cli/one", "x", "--daemon", d.socket).returncode == 0
    refused = run("pub", "cli/two", "x", "--daemon", d.socket)
    assert refused.returncode == 1 and "max_channels (1)" in refused.stderr, refused.stderr


@pytest.mark.parametrize("args", [
    ["sub", "c", "--count", "-1"], ["sub", "c", "--count", "0"], ["sub", "c", "--timeout", "-5"],
    ["sub", "c", "--format", "bogus"], ["cat", "s", "--chunk", "0"], ["cat", "s", "--chunk", "-5"],
    ["cat", "s", "--capacity", "3M"], ["pub", "c", "--capacity", "1000"],
    ["pub", "c", "--capacity", "lots"], ["pub", "c", "--mode", "fast"],
    ["pub", "c", "--delimiter", ""], ["health", "--timeout", "0"], ["top", "--interval", "0"],
    ["demo", "--seconds", "0"], ["nosuchcommand"], ["ls", "--nosuchoption"], ["pub"],
])
def test_usage_errors_exit_2_before_touching_the_daemon(args, tmp_path):
    # The daemon path does not exist: a usage error must be found before any connection.
    r = run(*args, "--daemon", str(tmp_path / "none.sock")) if args[0] not in (
        "demo", "nosuchcommand") else run(*args)
    assert r.returncode == 2, (args, r.stdout, r.stderr)
    assert "Error" in r.stderr or "error" in r.stderr, r.stderr


# -- bytes in, bytes out ---------------------------------------------------------------------------
def test_binary_messages_round_trip_in_every_format(daemon):
    payloads = [b"caf\xe9", b"\x00\xff\x01", "naïve".encode(), b"plain"]
    sep = b"\x1e\x1f"  # a two-byte delimiter; the payloads hold NUL bytes
    pub = run("pub", "cli/bin", "--daemon", daemon.socket, "--delimiter", "\\x1e\\x1f",
              input=b"".join(p + sep for p in payloads), text=False)
    assert pub.returncode == 0, pub.stderr

    def sub(*extra):
        r = run("sub", "cli/bin", "--daemon", daemon.socket, "--start", "oldest", "--count",
                str(len(payloads)), *extra, text=False)
        assert r.returncode == 0, r.stderr
        return r.stdout

    assert sub("--format", "raw", "--null") == b"".join(p + b"\0" for p in payloads)
    assert sub("--format", "raw", "--delimiter", "\\x1e\\x1f") == b"".join(p + sep
                                                                       for p in payloads)
    assert sub("--format", "hex").split(b"\n")[:-1] == [p.hex().encode() for p in payloads]
    text = sub("--format", "text", "--seq").decode("utf-8").splitlines()
    assert text == ["0\tcaf\\xe9", "1\t\x00\\xff\x01", "2\tnaïve", "3\tplain"]
    rows = [json.loads(line) for line in sub("--format", "json").splitlines()]
    assert [r["seq"] for r in rows] == [0, 1, 2, 3]
    import base64
    decoded = [base64.b64decode(r["base64"]) if "base64" in r else r["text"].encode()
               for r in rows]
    assert decoded == payloads
    assert "text" in rows[2] and "base64" in rows[0]


def test_non_utf8_arguments_and_custom_delimiters(daemon):
    arg = os.fsdecode(b"\xff\xfeargs")  # what a shell passes for non-UTF-8 bytes
    assert run("pub", "cli/args", arg, "--daemon", daemon.socket).returncode == 0
    r = run("pub", "cli/args", "--daemon", daemon.socket, "--delimiter", "\\x1e",
            input=b"a\x1eb\nc\x1e", text=False)
    assert r.returncode == 0, r.stderr
    out = run("sub", "cli/args", "--daemon", daemon.socket, "--start", "oldest", "--count", "3",
              "--format", "hex", text=False).stdout
    assert out.split() == [b"fffe61726773", b"61", b"620a63"]


def test_whole_stdin_as_one_message_with_a_bigger_ring(daemon):
    data = os.urandom(3 << 20)  # over the default ring's largest message (2 MiB - 16)
    r = run("pub", "cli/big", "--daemon", daemon.socket, "--whole", "--capacity", "8MiB",
            "--mode", "lossy", "-v", input=data, text=False)
    assert r.returncode == 0 and r.stdout == b"0\n", r.stderr
    ch = channels(daemon)["cli/big"]
    assert ch["capacity"] == 8 << 20 and ch["mode"] == "lossy"
    out = run("sub", "cli/big", "--daemon", daemon.socket, "--start", "oldest", "--count", "1",
              "--format", "raw", text=False)
    assert out.stdout == data + b"\n"


def test_a_refused_publish_creates_nothing(daemon_factory):
    daemon = daemon_factory("--max-capacity", str(1 << 23))
    too_big = run("pub", "cli/refused", "--daemon", daemon.socket, input=b"x" * (3 << 20),
                  text=False)
    assert too_big.returncode == 1 and b"MessageTooLarge" in too_big.stderr
    arg = run("pub", "cli/refused", "y" * 3000, "--capacity", "4K", "--daemon", daemon.socket)
    assert arg.returncode == 1 and "takes at most 2032 bytes" in arg.stderr, arg.stderr
    over = run("pub", "cli/refused", "z", "--capacity", "16M", "--daemon", daemon.socket)
    assert over.returncode == 2 and "max_capacity" in over.stderr, over.stderr
    empty = run("pub", "cli/refused", "--daemon", daemon.socket, input="")
    assert empty.returncode == 0
    assert "cli/refused" not in channels(daemon)
    assert stat_json(daemon)["shm_allocated"] == 0


def test_a_huge_line_is_refused_without_being_read_whole(daemon):
    """1 GiB with no newline: refused once it passes the largest message (2 MiB), after
    reading a few MiB, with memory bounded far below the input size."""
    feeder = subprocess.Popen(["head", "-c", str(1 << 30), "/dev/zero"], stdout=subprocess.PIPE)
    # The peak is the process's own VmHWM, printed at exit: ru_maxrss of a child also carries the
    # RSS of the (large) test process it was forked from, across exec.
    code = ("import atexit, sys\n"
            "atexit.register(lambda: sys.stderr.write(next(line for line in "
            "open('/proc/self/status') if line.startswith('VmHWM'))))\n"
            "from shimmy.cli import main\n"
            "sys.exit(main(sys.argv[1:]))\n")
    pub = subprocess.Popen([sys.executable, "-c", code, "pub", "cli/huge", "--daemon",
                            daemon.socket], stdin=feeder.stdout, stderr=subprocess.PIPE)
    feeder.stdout.close()
    err = pub.stderr.read().decode()
    pub.wait()
    feeder.kill()
    feeder.wait()
    assert pub.returncode == 1 and "MessageTooLarge" in err and "Traceback" not in err, err
    read = int(re.search(r"already (\d+) bytes read", err).group(1))
    assert (2 << 20) - 16 < read < 4 << 20, err
    peak_kib = int(re.search(r"VmHWM:\s+(\d+) kB", err).group(1))
    assert peak_kib < 256 * 1024, f"peak RSS {peak_kib} KiB for a 1 GiB line"
    assert "cli/huge" not in channels(daemon)


def test_sub_timeout_is_a_runtime_failure(daemon):
    r = run("sub", "cli/quiet", "--daemon", daemon.socket, "--timeout", "0.3")
    assert r.returncode == 1 and "no message on 'cli/quiet' within 0.3 s" in r.stderr


# -- closed pipes ----------------------------------------------------------------------------------
def closed_pipe_run(*args, timeout=60, **kw):
    """Run with stdout a pipe whose reader is already gone: every write fails with EPIPE."""
    r, w = os.pipe()
    os.close(r)
    try:
        p = subprocess.Popen([*SHIMMY, *args], stdout=w, stderr=subprocess.PIPE, **kw)
    finally:
        os.close(w)
    return p


@pytest.mark.parametrize("args", [["ls"], ["ls", "--json"], ["stat"], ["stat", "--json"],
                                  ["top", "--once", "--interval", "0.1"], ["--help"],
                                  ["health"]])
def test_closed_stdout_ends_quietly(daemon, args):
    run("pub", "cli/pipe", "x", "--daemon", daemon.socket)
    extra = [] if args == ["--help"] else ["--daemon", daemon.socket]
    p = closed_pipe_run(*args, *extra)
    err = p.stderr.read().decode()
    assert p.wait(60) == 0 and err == "", (args, err)


def test_sub_and_cat_with_a_closed_stdout(daemon):
    p = closed_pipe_run("sub", "cli/closed", "--daemon", daemon.socket)
    wait_for(lambda: channels(daemon).get("cli/closed", {}).get("subscribers"), "the subscriber")
    deadline = time.monotonic() + 30
    while p.poll() is None and time.monotonic() < deadline:
        run("pub", "cli/closed", "m", "--daemon", daemon.socket)
        time.sleep(0.1)
    err = p.stderr.read().decode()
    assert p.wait(5) == 0 and err == "", err

    import shimmy
    with shimmy.Stream("cli/closed-stream", daemon=daemon.socket).writer(timeout=10) as w:
        c = closed_pipe_run("cat", "cli/closed-stream", "--daemon", daemon.socket)
        w.write(b"x" * 10000)
        err = c.stderr.read().decode()
        assert c.wait(30) == 0 and err == "", err
    # the shell form of the report
    sh = subprocess.run(["bash", "-o", "pipefail", "-c",
                         f"{' '.join(SHIMMY)} stat --daemon {daemon.socket} | head -1"],
                        capture_output=True, text=True, timeout=60)
    assert sh.returncode == 0 and sh.stderr == "" and sh.stdout.startswith("shimmy daemon")


# -- streams ---------------------------------------------------------------------------------------
def test_ls_lists_streams_with_their_ends(daemon):
    import shimmy
    w = shimmy.Stream("cli/bytes", daemon=daemon.socket).writer()
    w.write(b"x" * 1000)
    table = run("ls", "--daemon", daemon.socket)
    assert table.returncode == 0, table.stderr
    line = next(ln for ln in table.stdout.splitlines() if ln.startswith("cli/bytes"))
    assert f"pid {os.getpid()}" in line and "1000 B" in line
    w.close()


def test_cat_refuses_a_channel_name_and_a_finished_stream_instead_of_hanging(daemon):
    run("pub", "cli/notastream", "x", "--daemon", daemon.socket)
    r = run("cat", "cli/notastream", "--daemon", daemon.socket, timeout=30)
    assert r.returncode == 1 and "is a pub/sub channel, not a stream" in r.stderr
    w = run("cat", "--write", "cli/once", "--daemon", daemon.socket, input="payload",
            timeout=30)
    assert w.returncode == 0, w.stderr
    first = run("cat", "cli/once", "--daemon", daemon.socket, "--timeout", "20", timeout=30)
    assert first.returncode == 0 and first.stdout == "payload"
    again = run("cat", "cli/once", "--daemon", daemon.socket, timeout=30)
    assert again.returncode == 1 and "already ended" in again.stderr, again.stderr
    assert not stat_json(daemon)["streams"], "the refused read created nothing"
    waited = run("cat", "cli/once", "--daemon", daemon.socket, "--wait", "--timeout", "0.3",
                 timeout=30)
    assert waited.returncode == 1 and "Traceback" not in waited.stderr
    # a new writer makes the name readable again
    assert run("cat", "--write", "cli/once", "--daemon", daemon.socket, input="two").returncode == 0
    assert run("cat", "cli/once", "--daemon", daemon.socket, "--timeout", "20").stdout == "two"


# -- stat ------------------------------------------------------------------------------------------
def test_stat_is_readable_and_counts_crashes_honestly(daemon):
    assert run("pub", "cli/stat", "hello", "--daemon", daemon.socket).returncode == 0
    counters = stat_json(daemon)["counters"]
    assert counters["clients_crashed"] == 0 and counters["clients_exited"] >= 1, counters
    victim = subprocess.Popen([*SHIMMY, "sub", "cli/stat", "--daemon", daemon.socket],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: channels(daemon)["cli/stat"]["subscribers"], "the subscriber")
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    wait_for(lambda: stat_json(daemon)["counters"]["clients_crashed"] == 1, "the crash count")

    summary = run("stat", "--daemon", daemon.socket)
    assert summary.returncode == 0, summary.stderr
    out = summary.stdout
    assert re.search(r"up \d+(\.\d)?s", out) and "4.0 MiB" in out, out
    assert re.search(r"clients_crashed\s+1\b", out), out
    assert "rdma off" in out and "cli/stat" in out and "reliable" in out
    raw = stat_json(daemon)
    assert raw["rdma"]["state"] == "off" and raw["pid"] == daemon.proc.pid


def test_bench_passes_its_arguments_through():
    r = run("bench", "--help")
    assert r.returncode == 0 and "--quick" in r.stdout
    bad = run("bench", "--no-such-bench-option")
    assert bad.returncode == 2 and "--no-such-bench-option" in bad.stderr


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


def test_fake_daemon_sending_garbage_gives_one_line_not_a_traceback(tmp_path):
    """A fake daemon (a bare unix listener answering every request frame with invalid msgpack)
    makes the SDK fail in an unplanned way: the user still gets one line and exit code 1."""
    import socket
    import threading

    from shimmy.protocol import frame
    path = str(tmp_path / "fake.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    listener.settimeout(0.1)
    stop = threading.Event()

    def answer():
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                try:
                    while conn.recv(65536):
                        conn.sendall(frame(b"\xc1"))
                except OSError:
                    pass

    t = threading.Thread(target=answer, daemon=True)
    t.start()
    try:
        r = run("ls", "--daemon", path, timeout=30)
    finally:
        stop.set()
        t.join(10)
        listener.close()
    assert r.returncode == 1, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("shimmy: "), r.stderr


def test_stat_json_is_the_daemons_own_view(daemon):
    from shimmy.sdk.client import DaemonClient
    pub = run("pub", "cli/view", "x", "--capacity", "64K", "--daemon", daemon.socket)
    assert pub.returncode == 0, pub.stderr
    cli_view = stat_json(daemon)
    client = DaemonClient(daemon.socket)
    try:
        own = client.request("stat")
    finally:
        client.close()
    for key in ("ok", "v", "id"):
        own.pop(key, None)
    assert set(cli_view) == set(own)
    for key in ("pid", "socket", "settings", "shm_allocated", "rdma"):
        assert cli_view[key] == own[key], key
    def steady(channels):   # without what moves with the clock
        return [{k: v["unread_bytes"] if k == "idle" else v for k, v in c.items()
                 if k != "idle_s"} for c in channels]
    assert steady(cli_view["channels"]) == steady(own["channels"])
    assert cli_view["channels"][0]["capacity"] == 64 << 10
