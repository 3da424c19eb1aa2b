"""Process plumbing for the benchmarks: the daemon, pinned worker processes, CPU-time accounting,
percentiles, and cleanup (also on Ctrl-C).

A :class:`Worker` is a process started with the ``spawn`` start method and pinned to one CPU
before it creates any thread (threads inherit the affinity, so ZeroMQ's I/O thread and the SDK's
heartbeat thread land on the same core).  The parent asks it to run one function at a time::

    w = Worker("sub", cpu=1)
    w.start_call("shimmy.bench.throughput", "receiver", transport="zmq-ipc", size=64)
    info = w.wait_ready()          # the function called ctl.ready(...) after its setup
    w.go()                         # ... and now runs its measured loop
    result = w.result()            # what the function returned

Functions run in the worker as ``fn(ctl, **kwargs)``; ``ctl.state`` is a dict that lives as long
as the worker, so sockets and channels can be opened once and reused across repetitions.
Every wait in the parent is bounded; a worker that does not answer in time is killed and the
measurement is reported as failed instead of hanging the run.  It must never leave a worker
behind: ``cleanup_all`` runs on every way out of a run.
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import traceback

_ctx = mp.get_context("spawn")
_live: list["Worker"] = []
_daemons: list["_ServerProcess"] = []


class BenchError(RuntimeError):
    """A measurement could not be taken (worker died, timed out or raised)."""


# -- accounting helpers ------------------------------------------------------------------------

def cpu_seconds() -> float:
    """User + system CPU seconds of this process, all threads included (getrusage SELF)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def percentile(sorted_values: list, p: float) -> float:
    """Nearest-rank percentile of an already sorted list (p in 0..100)."""
    if not sorted_values:
        return float("nan")
    k = max(0, min(len(sorted_values) - 1, int(round(p / 100.0 * len(sorted_values) + 0.5)) - 1))
    return sorted_values[k]


def median(values: list) -> float:
    vals = sorted(v for v in values if v is not None and v == v)
    if not vals:
        return float("nan")
    n = len(vals)
    return vals[n // 2] if n % 2 else (vals[n // 2 - 1] + vals[n // 2]) / 2


def cpus() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return list(range(os.cpu_count() or 1))


def pin(cpu: int | None) -> None:
    if cpu is None:
        return
    try:
        os.sched_setaffinity(0, {cpu})
    except (AttributeError, OSError):
        pass


# -- the daemon ---------------------------------------------------------------------------------

class _ServerProcess:
    """A server subprocess the benchmark started and must stop: SIGTERM, then SIGKILL after
    ``timeout``; its temporary directory goes with it."""

    proc: subprocess.Popen | None
    _tmp: tempfile.TemporaryDirectory

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        if self in _daemons:
            _daemons.remove(self)
        self._tmp.cleanup()


class Daemon(_ServerProcess):
    """A private ``shimmy daemon`` subprocess in a temporary directory (default settings, plus
    ``settings`` written to a config file)."""

    def __init__(self, settings: dict | None = None):
        self._tmp = tempfile.TemporaryDirectory(prefix="shimmy-bench-")
        self.dir = self._tmp.name
        self.socket = os.path.join(self.dir, "shimmyd.sock")
        self.log_path = os.path.join(self.dir, "daemon.log")
        self.proc: subprocess.Popen | None = None
        self.args = ["--socket", self.socket]
        if settings:
            cfg = os.path.join(self.dir, "shimmyd.toml")
            with open(cfg, "w") as fh:
                fh.writelines(f"{k} = {v!r}\n" for k, v in settings.items())
            self.args += ["--config", cfg]

    def start(self, timeout: float = 15.0) -> "Daemon":
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "shimmy.cli", "daemon", *self.args],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True)  # Ctrl-C in the terminal goes to us; we stop it in order
        log.close()
        _daemons.append(self)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            if os.path.exists(self.socket) and os.path.exists(self.socket + ".session"):
                return self
            time.sleep(0.02)
        raise BenchError(f"daemon did not start within {timeout} s:\n{self.log()}")

    def log(self) -> str:
        try:
            with open(self.log_path) as fh:
                return fh.read()[-4000:]
        except OSError:
            return ""

    def metrics_url(self, timeout: float = 10.0) -> str:
        """The /metrics URL the daemon announced (started with metrics_listen)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with open(self.log_path) as fh:
                for line in fh:
                    if "metrics on http://" in line:
                        return line.split("metrics on ", 1)[1].split()[0]
            time.sleep(0.02)
        raise BenchError(f"daemon announced no metrics endpoint:\n{self.log()}")



class RedisServer(_ServerProcess):
    """A private redis-server on 127.0.0.1 for the Redis pub/sub peer: no persistence, no
    output-buffer limit for pub/sub clients.  Stopped (and, if need be, killed) by :meth:`stop`
    and by :func:`cleanup_all`, so a benchmark never leaves one running."""

    def __init__(self, binary: str):
        self.binary = binary
        self._tmp = tempfile.TemporaryDirectory(prefix="shimmy-bench-redis-")
        self.proc: subprocess.Popen | None = None
        self.port = 0
        self.version = ""

    def start(self, timeout: float = 10.0) -> "RedisServer":
        import socket as _socket
        with _socket.socket() as probe:   # a free port on loopback
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.proc = subprocess.Popen(
            [self.binary, "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
             "--appendonly", "no", "--dir", self._tmp.name, "--protected-mode", "yes",
             "--client-output-buffer-limit", "pubsub 0 0 0", "--daemonize", "no",
             "--loglevel", "warning"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL,
            start_new_session=True)
        _daemons.append(self)
        deadline = time.monotonic() + timeout
        import redis
        r = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1.0)
        try:
            while True:
                if self.proc.poll() is not None:
                    raise BenchError(f"redis-server exited with {self.proc.returncode}")
                try:
                    self.version = r.info("server")["redis_version"]
                    return self
                except redis.ConnectionError:
                    if time.monotonic() > deadline:
                        raise BenchError("redis-server did not answer within "
                                         f"{timeout} s") from None
                    time.sleep(0.05)
        finally:
            r.close()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"



# -- workers ------------------------------------------------------------------------------------

class _Ctl:
    """The worker-side handle passed to benchmark functions."""

    def __init__(self, conn, state: dict):
        self._conn = conn
        self.state = state

    def ready(self, info=None):
        """Report setup done, then block until the parent says go; return what it sent."""
        self._conn.send(("ready", info))
        msg = self._conn.recv()
        if msg[0] != "go":
            raise BenchError(f"expected go, got {msg[0]!r}")
        return msg[1]

    def poll_stop(self) -> bool:
        """True if the parent has sent ``stop`` (non-blocking)."""
        if self._conn.poll():
            msg = self._conn.recv()
            return msg[0] == "stop"
        return False


def _worker_main(conn, cpu: int | None, env: dict) -> None:
    pin(cpu)  # before any thread exists
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    os.environ.update(env)
    state: dict = {}
    ctl = _Ctl(conn, state)
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            break
        if msg[0] == "quit":
            break
        if msg[0] != "call":
            continue
        _, modname, fname, kwargs = msg
        try:
            fn = getattr(importlib.import_module(modname), fname)
            out = fn(ctl, **kwargs)
            conn.send(("result", out))
        except BaseException:  # report everything; the parent decides
            try:
                conn.send(("error", traceback.format_exc()))
            except OSError:
                break
    for closer in state.get("_closers", []):
        try:
            closer()
        except Exception:
            pass


class Worker:
    def __init__(self, label: str, cpu: int | None, env: dict | None = None):
        self.label = label
        self.cpu = cpu
        self._conn, child = _ctx.Pipe()
        self.proc = _ctx.Process(target=_worker_main, args=(child, cpu, env or {}),
                                 name=f"shimmy-bench-{label}", daemon=True)
        self.proc.start()
        child.close()
        _live.append(self)

    def start_call(self, module: str, func: str, **kwargs) -> None:
        self._conn.send(("call", module, func, kwargs))

    def _recv(self, timeout: float, want: str):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.label}: no {want!r} within {timeout:.0f} s")
            if self._conn.poll(min(left, 0.5)):
                try:
                    kind, payload = self._conn.recv()
                except (EOFError, OSError):
                    raise BenchError(f"{self.label}: worker died") from None
                if kind == "error":
                    raise BenchError(f"{self.label} raised:\n{payload}")
                if kind != want:
                    raise BenchError(f"{self.label}: expected {want!r}, got {kind!r}")
                return payload
            if not self.proc.is_alive():
                raise BenchError(f"{self.label}: worker exited with {self.proc.exitcode}")

    def wait_ready(self, timeout: float = 30.0):
        return self._recv(timeout, "ready")

    def go(self, info=None) -> None:
        self._conn.send(("go", info))

    def stop_signal(self) -> None:
        self._conn.send(("stop", None))

    def result(self, timeout: float = 60.0):
        return self._recv(timeout, "result")

    def close(self, timeout: float = 3.0) -> None:
        if self.proc.is_alive():
            try:
                self._conn.send(("quit",))
            except OSError:
                pass
            self.proc.join(timeout)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(2.0)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(2.0)
        self._conn.close()
        if self in _live:
            _live.remove(self)


def run_pair(first: "Worker", second: "Worker", module: str, first_func: str, second_func: str,
             first_kw: dict, second_kw: dict, seconds: float) -> tuple[dict, dict]:
    """One two-sided measurement: start ``first`` (the side that listens or receives), then
    ``second`` with the address ``first`` reported, release both at once, and return
    ``(second's result, first's result)``."""
    first.start_call(module, first_func, **first_kw)
    address = first.wait_ready()
    second.start_call(module, second_func, address=address, **second_kw)
    second.wait_ready()
    first.go()
    second.go()
    return second.result(timeout=seconds + 60), first.result(timeout=60)


def repeat_measurements(ctx, suite: str, variants: list[dict], pairs: dict, measure) -> tuple:
    """Run ``measure(v, pair, size, rep)`` for every repetition, size and variant, interleaved
    (so a noisy moment hits every peer alike).  A variant that fails once is dropped from the
    rest of the run and its workers closed.  Returns ``(runs by (key, size), failures)``."""
    reps: dict = {}
    failed: dict = {}
    for rep in range(ctx.reps):
        for size in ctx.sizes:
            for v in variants:
                key = (v["transport"], v["variant"])
                if " ".join(key) in failed or size > v.get("max_size", size):
                    continue
                try:
                    reps.setdefault((key, size), []).append(measure(v, pairs[key], size, rep))
                except BenchError as exc:
                    failed[" ".join(key)] = str(exc)[-2000:]
                    ctx.log(f"  {suite} {v['label']} failed: {str(exc)[-300:]}")
                    close_all(pairs[key])
            ctx.log(f"  {suite} rep {rep + 1}/{ctx.reps} size {size} done")
    return reps, failed


def measure_pairs(ctx, suite: str, variants: list[dict], names, measure) -> tuple:
    """Start one pair of workers per variant (``names(key)``: their two names; the first is
    pinned to ``ctx.cpu_a``, the second to ``ctx.cpu_b``), run ``measure(v, pair, size, rep)``
    through :func:`repeat_measurements`, and close the workers.  Returns ``(rows, failures)``,
    a row ``(variant, size, runs)`` for every variant and size that has runs, in that order."""
    pairs: dict = {}
    try:
        for v in variants:
            key = (v["transport"], v["variant"])
            first, second = names(key)
            pairs[key] = (Worker(first, ctx.cpu_a), Worker(second, ctx.cpu_b))
        reps, failed = repeat_measurements(ctx, suite, variants, pairs, measure)
    finally:
        for pair in pairs.values():
            close_all(pair)
    rows = [(v, size, reps[key, size]) for v in variants
            for key in [(v["transport"], v["variant"])] for size in ctx.sizes
            if reps.get((key, size))]
    return rows, failed


def close_all(workers) -> None:
    for w in workers:
        try:
            w.close()
        except Exception:
            pass


def cleanup_workers() -> None:
    """Kill every worker this process started (a suite that failed may leave some behind)."""
    for w in list(_live):
        try:
            w.close(timeout=1.0)
        except Exception:
            pass


def cleanup_all() -> None:
    """Kill every worker and stop every daemon this process started (Ctrl-C, errors, exit)."""
    for w in list(_live):
        try:
            w.close(timeout=1.0)
        except Exception:
            pass
    for d in list(_daemons):
        try:
            d.stop()
        except Exception:
            pass
