"""Control-plane abuse run: does the daemon survive a hostile local tenant, and is a normal
client still served?

    python -m tests.abuse.control --seconds 60            # the full run (a few minutes of CPU)
    python -m tests.abuse.control --seconds 5 --clients 10 --idle 400   # a quick look

It starts its own daemon on a private socket (unix sockets only, nothing leaves the machine),
measures a normal client's request latency with the daemon idle, then for ``--seconds`` runs:

* ``--clients`` flooding control connections sending random requests and malformed ones, bytes
  that are no frame, frames over ``request_max_bytes``, empty frames, half frames left hanging
  (slowloris), ``hello`` after ``hello`` (half-open sessions) and tokens that never heartbeat;
  a connection the daemon closes is opened again;
* ``--idle`` idle connections, half on the control socket (never greet), half on the session
  socket (never send a token);

all as the unprivileged user ``shimmy-out`` when run as root (created if absent), else as the
caller.  Meanwhile the normal client (the caller's uid) keeps asking.  It reports, as JSON:
whether the daemon stayed up, its RSS and descriptor count before, at the peak and after, the
normal client's latency (median, p99) idle and under the flood, and what the flood got back.
Every phase is bounded; the daemon and every worker are stopped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import msgpack

from shimmy.protocol import FRAME_HEADER, frame

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OPS = ["open", "subscribe", "unsubscribe", "publish", "unpublish", "close", "list", "stat",
       "delete", "hello", "ping", "stream_open", "stream_close", "bogus"]
#: The run's daemon settings: short session timeouts so half-open and silent sessions are
#: removed within the run (docs/daemon.md explains each).
BURST = 16   # requests a flooding connection sends per round before reading replies
DAEMON_CONFIG = ("heartbeat_interval = 0.2\nlease_timeout = 1.0\nsession_timeout = 3.0\n"
                 "session_connect_timeout = 1.0\ncontrol_request_timeout = 1.0\n")


# -- workers (run in their own processes, possibly as another uid) ---------------------------------

def _random_value(rng: random.Random):
    return rng.choice([None, True, -1, 0, 2**63, 2**64 - 1, rng.randint(-2**31, 2**31), 1.5,
                       "", "ü" * 8, "x" * rng.randint(0, 300), b"\xff\x00", [1, "a"], {"k": 1},
                       "a/b", "../etc", rng.getrandbits(64)])


def _random_frame(rng: random.Random, pid: int) -> tuple[bytes, bool]:
    """Bytes for one control connection, and whether the daemon must close it after them."""
    kind = rng.random()
    if kind < 0.05:
        return rng.randbytes(rng.randint(1, 200)), True             # no frame at all
    if kind < 0.08:
        return FRAME_HEADER.pack(rng.choice([0, 65537, 1 << 31])), True   # empty or oversized
    if kind < 0.10:   # half a frame, then nothing (slowloris): closed at control_request_timeout
        return FRAME_HEADER.pack(rng.randint(10, 1000)) + b"\x81", True
    if kind < 0.15:
        return frame(rng.randbytes(rng.randint(1, 200))), True     # a frame that is no map
    if kind < 0.35:
        return frame(msgpack.packb({"v": 2, "id": rng.randint(1, 1 << 30), "op": "hello",
                                    "pid": rng.choice([pid, -5, 2**63])})), False
    req = {"v": rng.choice([2, 2, 2, 1]), "id": rng.randint(0, 1 << 30), "op": rng.choice(OPS)}
    for key in rng.sample(["client", "token", "name", "mode", "capacity", "start", "slot", "pid",
                           "create", "role", "serial"], rng.randint(0, 6)):
        req[key] = _random_value(rng)
    return frame(msgpack.packb(req)), False


class _Conn:
    """One flooding control connection: what it sent, and the replies it has read back."""

    def __init__(self, path: str):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        try:
            self.sock.connect(path)
        except (BlockingIOError, InterruptedError):
            pass
        self.buf = b""
        self.doomed = False   # sent what the daemon closes connections for

    def replies(self) -> list:
        out = []
        while len(self.buf) >= FRAME_HEADER.size:
            (size,) = FRAME_HEADER.unpack_from(self.buf)
            if len(self.buf) < FRAME_HEADER.size + size:
                break
            out.append(self.buf[FRAME_HEADER.size:FRAME_HEADER.size + size])
            self.buf = self.buf[FRAME_HEADER.size + size:]
        return out


def flood(sock_path: str, seconds: float, sockets: int, seed: int) -> dict:
    """Send random bytes over ``sockets`` control connections for ``seconds``.  A connection
    that sent what the daemon closes connections for is set aside until the daemon closes it
    (half frames wait out control_request_timeout) and a new one takes its place; the tokens of
    successful hellos are presented on the session socket, which then falls silent.  Returns
    counts."""
    rng = random.Random(seed)
    conns = [_Conn(sock_path) for _ in range(sockets)]
    ending: list[_Conn] = []   # doomed: waiting for the daemon to close them
    counts = {"sent": 0, "answered": 0, "closed_by_daemon": 0}
    codes: dict[str, int] = {}
    silent: list[socket.socket] = []

    def read(c: _Conn) -> bool:
        """Read what ``c`` has; True when the daemon closed it."""
        try:
            chunk = c.sock.recv(1 << 16)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            chunk = b""
        c.buf += chunk
        for payload in c.replies():
            try:
                reply = msgpack.unpackb(payload, raw=False)
            except Exception:
                codes["undecodable"] = codes.get("undecodable", 0) + 1
                continue
            counts["answered"] += 1
            code = "ok" if reply.get("ok") else (reply.get("error") or {}).get("code", "?")
            codes[code] = codes.get(code, 0) + 1
            if reply.get("ok") and "session" in reply and len(silent) < 50:
                conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                try:   # a session that presents its token, then never heartbeats
                    conn.connect(reply["session"])
                    conn.sendall(reply["token"].encode() + b"\n")
                    silent.append(conn)
                except OSError:
                    conn.close()
        if chunk:
            return False
        counts["closed_by_daemon"] += 1
        c.sock.close()
        return True

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        before = counts["answered"]
        for i, c in enumerate(conns):
            for _ in range(BURST):   # pipelined, as fast as the daemon takes them
                data, c.doomed = _random_frame(rng, os.getpid())
                try:
                    c.sock.send(data)
                    counts["sent"] += 1
                except (BlockingIOError, InterruptedError):
                    c.doomed = False
                    break
                except OSError:
                    c.doomed = True
                if c.doomed:
                    break
            if read(c):
                conns[i] = _Conn(sock_path)
            elif c.doomed:
                ending.append(c)
                conns[i] = _Conn(sock_path)
        ending = [c for c in ending if not read(c)]
        while len(ending) > 20 * sockets:   # bounded: the oldest is given up on
            ending.pop(0).sock.close()
        if counts["answered"] == before:
            time.sleep(0.001)
    for conn in silent:
        conn.close()
    for c in conns + ending:
        c.sock.close()
    return {**counts, "codes": codes, "silent_sessions": len(silent)}


def idle(sock_path: str, seconds: float, count: int) -> dict:
    """Hold ``count`` connections that never speak (half on each socket) for ``seconds``."""
    held, failed = [], 0
    for i in range(count):
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.setblocking(False)
        try:
            conn.connect(sock_path if i % 2 else sock_path + ".session")
            held.append(conn)
        except (BlockingIOError, InterruptedError):
            held.append(conn)
        except OSError:
            failed += 1
            conn.close()
    time.sleep(max(0.0, seconds))
    for conn in held:
        conn.close()
    return {"held": len(held), "refused": failed}


def worker_main(argv: list[str]) -> None:
    role, sock_path, seconds, n, seed = argv[0], argv[1], float(argv[2]), int(argv[3]), int(argv[4])
    result = flood(sock_path, seconds, n, seed) if role == "flood" else idle(sock_path, seconds, n)
    print(json.dumps(result), flush=True)


# -- the run ---------------------------------------------------------------------------------------

def _proc_stat(pid: int) -> dict:
    rss = 0
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    kinds: dict[str, int] = {}
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            kind = os.readlink(f"/proc/{pid}/fd/{fd}").split(":")[0]
        except OSError:
            continue
        kinds[kind] = kinds.get(kind, 0) + 1
    return {"rss_kib": rss, "fds": sum(kinds.values()), "fd_kinds": kinds}


def _latencies(client, seconds: float, pause: float) -> tuple[list[float], int]:
    out, errors = [], 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        try:
            client.request("list")
            out.append(time.perf_counter() - t0)
        except Exception:
            errors += 1
        time.sleep(pause)
    return out, errors


def _summary(samples: list[float]) -> dict:
    if not samples:
        return {"n": 0}
    ordered = sorted(samples)
    return {"n": len(samples), "median_ms": round(statistics.median(ordered) * 1e3, 3),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1e3, 3)}


def _worker_command(user: str | None, args: list[str]) -> list[str]:
    code = "import sys; from tests.abuse.control import worker_main; worker_main(sys.argv[1:])"
    if user is None:
        return [sys.executable, "-c", code, *args]
    from tests.abuse import uids
    return uids.command_as(user, code, *args)


def run(seconds: float = 60, clients: int = 50, idle_connections: int = 2000,
        per_worker: int = 10, attacker: str | None = "auto") -> dict:
    if attacker == "auto":
        attacker = None
        if os.geteuid() == 0:
            from tests.abuse import uids
            uids.ensure_users()
            attacker = "shimmy-out"
    directory = tempfile.mkdtemp(prefix="shimmy-abuse-")
    os.chmod(directory, 0o755)
    sock_path = os.path.join(directory, "shimmyd.sock")
    with open(os.path.join(directory, "abuse.toml"), "w") as fh:
        fh.write(DAEMON_CONFIG)
    log = open(os.path.join(directory, "daemon.log"), "w")
    daemon = subprocess.Popen([sys.executable, "-m", "shimmy.cli", "daemon", "--socket", sock_path,
                               "--config", fh.name], stdout=log, stderr=subprocess.STDOUT,
                              cwd=REPO)
    workers: list[subprocess.Popen] = []
    report: dict = {"seconds": seconds, "clients": clients, "idle_connections": idle_connections,
                    "attacker": attacker or f"uid {os.geteuid()}"}
    try:
        deadline = time.monotonic() + 20
        while "daemon ready" not in open(log.name).read():
            if daemon.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("daemon did not start:\n" + open(log.name).read())
            time.sleep(0.05)
        import shimmy
        from shimmy.sdk.client import get_client
        normal = get_client(sock_path)
        with shimmy.Channel("normal/warmup", daemon=sock_path):
            pass
        report["before"] = _proc_stat(daemon.pid)
        idle_lat, idle_err = _latencies(normal, min(5.0, max(1.0, seconds / 4)), 0.002)
        report["latency_idle"] = {**_summary(idle_lat), "errors": idle_err}
        env = {**os.environ, "HOME": "/tmp", "PYTHONPATH": REPO}
        n_flood = max(1, clients // per_worker)
        for i in range(n_flood):
            workers.append(subprocess.Popen(
                _worker_command(attacker, ["flood", sock_path, str(seconds),
                                           str(min(per_worker, clients - i * per_worker)), str(i)]),
                stdout=subprocess.PIPE, text=True, cwd=REPO, env=env))
        workers.append(subprocess.Popen(
            _worker_command(attacker, ["idle", sock_path, str(seconds), str(idle_connections),
                                       "0"]), stdout=subprocess.PIPE, text=True, cwd=REPO, env=env))
        peak = {k: report["before"][k] for k in ("rss_kib", "fds")}
        flood_lat: list[float] = []
        flood_err = 0
        end = time.monotonic() + seconds
        while time.monotonic() < end and daemon.poll() is None:
            lat, err = _latencies(normal, min(1.0, end - time.monotonic()), 0.005)
            flood_lat += lat
            flood_err += err
            now = _proc_stat(daemon.pid)
            peak = {k: max(peak[k], now[k]) for k in ("rss_kib", "fds")}
        report["latency_flood"] = {**_summary(flood_lat), "errors": flood_err}
        report["peak"] = peak
        results = []
        for w in workers:
            out, _ = w.communicate(timeout=seconds + 60)
            lines = out.strip().splitlines()
            results.append(json.loads(lines[-1]) if lines else {"exit": w.returncode})
        codes: dict[str, int] = {}
        for r in results:
            for k, v in r.get("codes", {}).items():
                codes[k] = codes.get(k, 0) + v
        report["flood"] = {"sent": sum(r.get("sent", 0) for r in results),
                           "answered": sum(r.get("answered", 0) for r in results),
                           "codes": codes,
                           "silent_sessions": sum(r.get("silent_sessions", 0) for r in results),
                           "closed_by_daemon": sum(r.get("closed_by_daemon", 0)
                                                   for r in results),
                           "idle": next((r for r in results if "held" in r), {})}
        # Afterwards: everything the flood held is released within the session timeouts
        # (half-open hellos after session_connect_timeout, silent sessions at EOF or
        # session_timeout).
        settle = time.monotonic() + 15
        while True:
            after = _proc_stat(daemon.pid)
            clients = len(normal.request("stat")["clients"])
            if (after["fds"] <= report["before"]["fds"] + 2 and clients == 1) \
                    or time.monotonic() > settle:
                break
            time.sleep(0.25)
        report["after"] = after
        report["settled_s"] = round(15 - (settle - time.monotonic()), 2)
        with shimmy.Channel("normal/after", daemon=sock_path) as ch:
            sub = ch.subscribe()
            ch.publish(b"still here")
            report["served_after"] = bytes(sub.receive(timeout=5)) == b"still here"
        stat = normal.request("stat")
        report["daemon_clients_after"] = len(stat["clients"])
        report["daemon_counters"] = {k: v for k, v in stat["counters"].items()
                                     if k in ("requests", "errors", "malformed",
                                              "accept_errors", "connections_refused",
                                              "sessions_timed_out", "hellos_expired",
                                              "control_accept_errors",
                                              "control_connections_refused",
                                              "control_connections_timed_out",
                                              "control_frames_refused")}
        if idle_lat and flood_lat:
            report["latency_ratio_median"] = round(statistics.median(flood_lat)
                                                   / statistics.median(idle_lat), 2)
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
        report["daemon_alive"] = daemon.poll() is None
        if daemon.poll() is None:
            daemon.send_signal(signal.SIGTERM)
            try:
                report["daemon_exit"] = daemon.wait(15)
            except subprocess.TimeoutExpired:
                daemon.kill()
                report["daemon_exit"] = daemon.wait()
        log.close()
        text = open(log.name).read()
        report["daemon_tracebacks"] = text.count("Traceback")
        shutil.rmtree(directory, ignore_errors=True)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.abuse.control", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=60, help="length of the flood (default 60)")
    p.add_argument("--clients", type=int, default=50,
                   help="flooding control connections (default 50)")
    p.add_argument("--idle", type=int, default=2000, help="idle connections (default 2000)")
    p.add_argument("--as-caller", action="store_true",
                   help="flood as the caller's uid even when root (default: shimmy-out)")
    args = p.parse_args(argv)
    if not 0 < args.seconds <= 600 or not 0 < args.clients <= 500 or not 0 <= args.idle <= 10000:
        p.error("bounds: 0 < seconds <= 600, 0 < clients <= 500, 0 <= idle <= 10000")
    report = run(args.seconds, args.clients, args.idle,
                 attacker=None if args.as_caller else "auto")
    print(json.dumps(report, indent=2))
    ok = (report["daemon_alive"] and report.get("served_after")
          and report["daemon_tracebacks"] == 0)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
