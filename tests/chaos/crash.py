"""The crash matrix: SIGKILL publishers, subscribers, the daemon, stream ends and a peer daemon
at random points, with real processes and real daemons, and count what must never happen.

The soak (every row, 1,000 kills each, two rows at a time):

    nice python -m tests.chaos.crash --trials 1000 --jobs 2 --max-seconds 7200 --json crash.json

Rows (kind x mode; streams have no mode) and what one trial does:

publisher   a publisher process is killed at a random instant (during open, role hand-over,
            publish, loan, PAD, wrap, waiting for room); then ``list`` must work and not report
            the channel broken, a new subscriber must join, and a successor publisher must
            publish 30 messages; a subscriber attached for the whole row checks every message.
subscriber  a subscriber process is killed at a random instant (subscribe, receive, release)
            while a long-running publisher publishes; ``list`` must work, a new subscriber
            must receive within 5 s (a reliable publisher is not wedged by the dead slot).
daemon      the daemon is killed at a random instant while a publisher and a subscriber run;
            it is restarted on the same socket: it must sweep every object of its
            predecessor, the old clients must end (retired channel or daemon gone) within
            10 s, and a fresh exchange (list, open, subscribe, 20 messages) must work.
group       a channel with max_publishers 4 (a publisher group): three long-running publisher
            processes, and per trial a fourth that is killed at a random instant (0-300 ms of its
            life: open, the publish request, publish, loan, PAD, wrap, waiting for room; a
            quarter publish 1-100 messages and close, so some die closing).  Then: each
            long-running publisher must deliver again within 5 s; ``list`` must work and not
            report the channel broken; a new subscriber must join; a successor publisher must
            take the dead one's place and publish 30 messages, received up to the last one by
            the row's subscriber and the new one (reliable: all 30); within 5 s the dead
            publisher's and the successor's member rings must be reclaimed (gone from
            /dev/shm) and every ``publish()`` of the dead one that returned must have been
            received.  One subscriber, attached for the whole row, checks every message per
            publisher (``Message.publisher``, ``Message.seq``, that publisher's own ``lost``):
            the payload is made for (publisher id, seq), each publisher's first message must be
            its seq 0 (lossy: ``lost`` counts what it missed before).
stream      the writer or the reader of a byte stream is killed at a random instant; the
            survivor must see everything committed, intact, then StreamBroken within 5 s, and
            the stream must be freed.
peer-source, peer-replica
            the daemon of the publishing (source) or subscribing (replica) node of a pair of
            namespaced nodes is killed mid-stream and restarted; tests/chaos/peer.py says
            exactly what a trial does and what each count means there (loss is counted by the
            publisher's own index, so what dies with a source's ring is seen).

``received`` counts messages checked (stream rows: bytes); the group rows' JSON also has
``victims_published``, the trials whose victim had a ``publish()`` return before the kill.
Counts (must all be 0): torn (payload checksum or stream bytes wrong), lost and duplicated
(reliable), lost_inexact (lossy: ``Message.lost`` differs from the gap in sequence numbers),
wedged (a survivor, successor or new subscriber failed or timed out), stale_objects (shared
memory left after a row's daemon stopped, or left by a killed daemon after the restart's sweep,
or a group member ring not reclaimed within 5 s of its publisher leaving and being drained),
daemon_deaths (the daemon exited without being killed), errors (anything unexpected).
Prints a table and writes JSON; exit status 1 when any count is not 0.  Bounded by --trials
per row and --max-seconds overall (what is left is split evenly between the rows, or with
--jobs N between the waves of N rows, still to start).  The peer rows need root, unshare
and nsenter.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import shimmy
from shimmy.daemon.segments import daemon_id
from shimmy.errors import ShimmyError
from shimmy.sdk.client import DaemonClient, get_client

from . import payloads, peer, workers

KINDS = ("publisher", "subscriber", "group", "daemon", "stream", *peer.KINDS)
MODES = ("reliable", "lossy")
ZERO_KEYS = ("torn", "lost", "duplicated", "lost_inexact", "wedged", "stale_objects",
             "daemon_deaths", "errors")
CAPACITY = 16384        # small: frames of up to 616 bytes wrap (and PAD) every ~50 messages
MAX_SIZE = 600
STREAM_CAPACITY = 8192


class Daemon:
    """A real ``shimmy daemon`` on a private socket."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="shimmy-chaos-")
        self.socket = os.path.join(self.dir, "shimmyd.sock")
        self.log_path = os.path.join(self.dir, "daemon.log")
        self.prefix = f"shimmy.{daemon_id(self.socket)}."
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 20.0) -> None:
        before = self._log().count("daemon ready")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "shimmy.cli", "daemon", "--socket", self.socket],
                stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}")
            if self._log().count("daemon ready") > before:
                return
            time.sleep(0.01)
        raise RuntimeError(f"daemon not ready within {timeout} s")

    def _log(self) -> str:
        try:
            with open(self.log_path) as fh:
                return fh.read()
        except FileNotFoundError:
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.terminate()
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def objects(self) -> list[str]:
        return sorted(e for e in os.listdir("/dev/shm")
                      if e.startswith(self.prefix) or e.startswith("sem." + self.prefix))


class Row:
    def __init__(self, kind: str, mode: str):
        self.kind, self.mode = kind, mode
        self.counts = {"trials": 0, **{k: 0 for k in ZERO_KEYS}, "received": 0}
        self.notes: list[str] = []
        self.started = time.monotonic()

    def bad(self, key: str, note: str, n: int = 1) -> None:
        self.counts[key] += n
        if len(self.notes) < 20:
            self.notes.append(f"trial {self.counts['trials']}: {key}: {note}")

    def add_checker(self, check: workers.Checker) -> None:
        for key in ("torn", "lost", "duplicated", "lost_inexact"):
            if check.counts[key]:
                self.bad(key, "; ".join(check.notes), check.counts[key])
                check.counts[key] = 0
        self.counts["received"] += check.counts["received"]
        check.counts["received"] = 0

    def result(self) -> dict:
        return {"kind": self.kind, "mode": self.mode, **self.counts,
                "seconds": round(time.monotonic() - self.started, 1), "notes": self.notes}


def pump(pairs, until: float, stop=lambda: False) -> None:
    """Drain every (checker, subscription) until the deadline or ``stop()``."""
    while time.monotonic() < until and not stop():
        if not sum(check.drain(sub, 2000) for check, sub in pairs):
            time.sleep(0.0002)


def kill(proc, row: "Row | None" = None) -> None:
    """SIGKILL ``proc`` (a victim must still be running then: else ``row`` records why)."""
    if proc.exitcode is not None and proc.exitcode != 0 and row is not None:
        row.bad("errors", f"the process to kill had already exited with {proc.exitcode}")
    if proc.pid is not None and proc.exitcode is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.join()


def listing(row: Row, sock: str, name: str) -> None:
    """``list`` must answer and must not report ``name`` broken."""
    try:
        entries = get_client(sock).request("list")["channels"]
    except ShimmyError as exc:
        row.bad("wedged", f"list failed: {exc}")
        return
    for entry in entries:
        if entry["name"] == name and entry.get("broken"):
            row.bad("wedged", f"list reports {name} broken: {entry['broken']}")


def row_publisher(ctx, row: Row, d: Daemon, trials: int, end: float, rng: random.Random) -> None:
    name = f"chaos.publisher.{row.mode}"
    ch = shimmy.Channel(name, daemon=d.socket, mode=row.mode, capacity=CAPACITY)
    check = workers.Checker(row.mode)
    sub = ch.subscribe()
    while row.counts["trials"] < trials and time.monotonic() < end:
        victim = ctx.Process(target=workers.publish, args=(
            d.socket, name, row.mode, CAPACITY, MAX_SIZE, -1, rng.random()))
        victim.start()
        pump([(check, sub)], time.monotonic() + rng.uniform(0, 0.15))
        kill(victim, row)
        pump([(check, sub)], time.monotonic() + 0.01)
        listing(row, d.socket, name)
        fresh_check = workers.Checker(row.mode)
        try:
            fresh = ch.subscribe()
        except ShimmyError as exc:
            row.bad("wedged", f"new subscriber refused: {exc}")
            fresh = None
        successor = ctx.Process(target=workers.publish, args=(
            d.socket, name, row.mode, CAPACITY, MAX_SIZE, 30, rng.random()))
        successor.start()
        pairs = [(check, sub)] + ([(fresh_check, fresh)] if fresh else [])
        pump(pairs, time.monotonic() + 20, stop=lambda p=successor: p.exitcode is not None)
        pump(pairs, time.monotonic() + 0.02)
        if successor.exitcode != 0:
            row.bad("wedged", f"successor publisher exit code {successor.exitcode}")
            kill(successor)
        if fresh is not None:
            if fresh_check.counts["received"] < 30 and row.mode == "reliable":
                row.bad("wedged", f"new subscriber got {fresh_check.counts['received']} of 30")
            row.add_checker(fresh_check)
            fresh.close()
        row.add_checker(check)
        if not d.alive():
            row.bad("daemon_deaths", "daemon exited")
            break
        row.counts["trials"] += 1
    ch.close()


def row_subscriber(ctx, row: Row, d: Daemon, trials: int, end: float, rng: random.Random) -> None:
    name = f"chaos.subscriber.{row.mode}"
    ch = shimmy.Channel(name, daemon=d.socket, mode=row.mode, capacity=CAPACITY)
    check = workers.Checker(row.mode)
    sub = ch.subscribe()
    publisher = ctx.Process(target=workers.publish, args=(
        d.socket, name, row.mode, CAPACITY, MAX_SIZE, -1, 1, 50))
    publisher.start()
    while row.counts["trials"] < trials and time.monotonic() < end:
        victim = ctx.Process(target=workers.subscribe, args=(
            d.socket, name, row.mode, CAPACITY, 30.0))
        victim.start()
        pump([(check, sub)], time.monotonic() + rng.uniform(0, 0.15))
        kill(victim, row)
        listing(row, d.socket, name)
        fresh_check = workers.Checker(row.mode)
        try:
            fresh = ch.subscribe()
            pump([(check, sub), (fresh_check, fresh)], time.monotonic() + 5,
                 stop=lambda c=fresh_check: c.counts["received"] >= 5)
            if fresh_check.counts["received"] < 5:
                row.bad("wedged", f"new subscriber got {fresh_check.counts['received']} "
                                  f"messages in 5 s (publisher exit code {publisher.exitcode})")
            row.add_checker(fresh_check)
            fresh.close()
        except ShimmyError as exc:
            row.bad("wedged", f"new subscriber: {exc}")
        row.add_checker(check)
        if publisher.exitcode is not None:
            row.bad("errors", f"publisher exited with {publisher.exitcode}")
            break
        if not d.alive():
            row.bad("daemon_deaths", "daemon exited")
            break
        row.counts["trials"] += 1
    kill(publisher)
    ch.close()


GROUP_PUBLISHERS = 4    # max_publishers of the group rows: GROUP_STEADY + the victim's place
GROUP_STEADY = 3
BOUND_S = 5.0           # group rows: survivors deliver, the dead member is reclaimed, within


def row_group(ctx, row: Row, d: Daemon, trials: int, end: float, rng: random.Random) -> None:
    name = f"chaos.group.{row.mode}"
    ch = shimmy.Channel(name, daemon=d.socket, mode=row.mode, capacity=CAPACITY,
                        max_publishers=GROUP_PUBLISHERS)
    check = workers.GroupChecker(row.mode)
    sub = ch.subscribe()
    pairs = [(check, sub)]
    # what each publisher process reports: [publisher id, publishes returned]
    reports = [ctx.Array("q", [-1, 0], lock=False) for _ in range(GROUP_STEADY + 2)]
    steady_r, (victim_r, succ_r) = reports[:GROUP_STEADY], reports[GROUP_STEADY:]
    steady = [ctx.Process(target=workers.publish, args=(
        d.socket, name, row.mode, CAPACITY, MAX_SIZE, -1, i, 50, GROUP_PUBLISHERS, steady_r[i]))
        for i in range(GROUP_STEADY)]
    for p in steady:
        p.start()
    try:
        pump(pairs, time.monotonic() + 20,
             stop=lambda: all(check.received(r[0]) for r in steady_r))
        if not all(check.received(r[0]) for r in steady_r):
            row.bad("wedged", "the long-running publishers did not all deliver within 20 s")
            return
        baseline = _rings(d)   # the channel's ring and the steady publishers' members
        while row.counts["trials"] < trials and time.monotonic() < end:
            _group_trial(ctx, row, d, name, check, sub, steady_r, victim_r, succ_r, baseline, rng)
            _add_group(row, check)
            if any(p.exitcode is not None for p in steady):
                row.bad("errors", f"a long-running publisher exited: "
                                  f"{[p.exitcode for p in steady]}")
                break
            if not d.alive():
                row.bad("daemon_deaths", "daemon exited")
                break
            row.counts["trials"] += 1
    finally:
        for p in steady:
            kill(p)
        ch.close()


def _group_trial(ctx, row: Row, d: Daemon, name: str, check: workers.GroupChecker, sub,
                 steady_r, victim_r, succ_r, baseline: set[str], rng: random.Random) -> None:
    """One kill of a group publisher, then the checks of the module docstring."""
    pairs = [(check, sub)]
    victim_r[0], victim_r[1] = -1, 0
    # a quarter of the victims publish a few messages and close: some die while closing
    count = -1 if rng.random() < 0.75 else rng.randint(1, 100)
    victim = ctx.Process(target=workers.publish, args=(
        d.socket, name, row.mode, CAPACITY, MAX_SIZE, count, rng.random(), 0, GROUP_PUBLISHERS,
        victim_r))
    victim.start()
    # 0-300 ms: about the first third of the victims die before their member exists (open,
    # hello, the publish request), the others while publishing
    pump(pairs, time.monotonic() + rng.uniform(0, 0.3))
    kill(victim, row)
    vid, returned = victim_r[0], victim_r[1]
    # the survivors keep delivering
    before = {r[0]: check.received(r[0]) for r in steady_r}
    pump(pairs, time.monotonic() + BOUND_S,
         stop=lambda: all(check.received(p) > n for p, n in before.items()))
    for p, n in before.items():
        if check.received(p) == n:
            row.bad("wedged", f"publisher {p} delivered nothing {BOUND_S} s after the kill")
    listing(row, d.socket, name)
    # a new subscriber joins, a new publisher takes the dead one's place and publishes 30
    fresh_check = workers.GroupChecker(row.mode, from_start=False)
    try:
        fresh = _subscription(d, name, row.mode)
    except ShimmyError as exc:
        row.bad("wedged", f"new subscriber refused: {exc}")
        fresh = None
    succ_r[0], succ_r[1] = -1, 0
    successor = ctx.Process(target=workers.publish, args=(
        d.socket, name, row.mode, CAPACITY, MAX_SIZE, 30, rng.random(), 0, GROUP_PUBLISHERS,
        succ_r))
    successor.start()
    both = pairs + ([(fresh_check, fresh[1])] if fresh else [])
    pump(both, time.monotonic() + 20, stop=lambda: successor.exitcode is not None)
    sid = succ_r[0]
    pump(both, time.monotonic() + BOUND_S,
         stop=lambda: check.last(sid) >= 29 and (fresh is None or fresh_check.last(sid) >= 29))
    if successor.exitcode != 0:
        row.bad("wedged", f"successor publisher exit code {successor.exitcode}")
        kill(successor)
    elif check.last(sid) != 29:
        row.bad("lost" if check.reliable else "lost_inexact",
                f"successor {sid}: last seq received {check.last(sid)}, published 0..29")
    if fresh is not None:
        if fresh_check.last(sid) != 29 or (check.reliable and fresh_check.received(sid) != 30):
            row.bad("wedged", f"new subscriber got {fresh_check.received(sid)} of the "
                              f"successor's 30 (last seq {fresh_check.last(sid)})")
        _add_group(row, fresh_check)
        fresh[0].close()
    # the dead publisher's member (and the successor's) is reclaimed once drained, and every
    # publish of the dead one that returned was delivered
    pump(pairs, time.monotonic() + BOUND_S, stop=lambda: _rings(d) <= baseline)
    extra = sorted(_rings(d) - baseline)
    baseline |= set(extra)   # counted once: later trials check only what is new
    if extra:
        row.bad("stale_objects", f"{BOUND_S} s after the publishers left and the subscribers "
                                 f"drained: {extra}", len(extra))
    if returned:
        row.counts["victims_published"] = row.counts.get("victims_published", 0) + 1
    if returned and check.last(vid) + 1 < returned:
        row.bad("lost" if check.reliable else "lost_inexact",
                f"killed publisher {vid}: {returned} publishes returned, last seq received "
                f"{check.last(vid)}")


def _rings(d: Daemon) -> set[str]:
    """The daemon's ring objects (semaphores aside: a group's are its channel's, one per
    subscriber slot used, kept with the channel)."""
    return {o for o in d.objects() if not o.startswith("sem.")}


def _subscription(d: Daemon, name: str, mode: str):
    """A subscription on a Channel object of its own: (channel, subscription)."""
    ch = shimmy.Channel(name, daemon=d.socket, mode=mode, capacity=CAPACITY,
                        max_publishers=GROUP_PUBLISHERS)
    try:
        return ch, ch.subscribe()
    except ShimmyError:
        ch.close()
        raise


def _add_group(row: Row, check: workers.GroupChecker) -> None:
    c = check.take_counts()
    for key in ("torn", "lost", "duplicated", "lost_inexact"):
        if c[key]:
            row.bad(key, "; ".join(c["notes"]), c[key])
    row.counts["received"] += c["received"]


def row_daemon(ctx, row: Row, d: Daemon, trials: int, end: float, rng: random.Random) -> None:
    name = f"chaos.daemon.{row.mode}"
    while row.counts["trials"] < trials and time.monotonic() < end:
        recv, send = ctx.Pipe(duplex=False)
        pub = ctx.Process(target=workers.publish, args=(
            d.socket, name, row.mode, CAPACITY, MAX_SIZE, -1, rng.random(), 20))
        sub = ctx.Process(target=workers.subscribe, args=(
            d.socket, name, row.mode, CAPACITY, 30.0, send))
        sub.start()
        pub.start()
        time.sleep(rng.uniform(0, 0.4))
        if rng.random() < 0.5:
            # Half the trials also kill the subscriber just before the daemon, so the daemon
            # dies while reclaiming its slot (or before it noticed).
            kill(sub)
            time.sleep(rng.uniform(0, 0.005))
        if not d.alive():
            row.bad("daemon_deaths", "daemon exited before the kill")
        d.kill()
        try:
            d.start()
        except RuntimeError as exc:
            row.bad("daemon_deaths", f"restart failed: {exc}")
            kill(pub)
            kill(sub)
            break
        stale = _unowned_objects(d)
        if stale:
            row.bad("stale_objects", f"after the restart's sweep: {stale}", len(stale))
        for proc, what in ((sub, "subscriber"), (pub, "publisher")):
            deadline = time.monotonic() + 10
            while proc.exitcode is None:
                proc.join(0.05)
                # A worker that reached no daemon before the kill connects to the new one
                # (its queued hello is answered there) and runs on normally: not wedged.
                if proc.exitcode is None and proc.pid in _client_pids(d):
                    kill(proc)
                elif time.monotonic() > deadline:
                    row.bad("wedged", f"old {what} still running 10 s after the daemon "
                                      f"restart, and not a client of the new daemon")
                    kill(proc)
            if proc.exitcode not in (0, -signal.SIGKILL):
                row.bad("errors", f"old {what} exit code {proc.exitcode}")
        # only a subscriber that ended by itself sent its counts (poll(1) on a killed one's
        # pipe was half of a daemon trial's cost)
        if sub.exitcode == 0 and recv.poll(1):
            counts = recv.recv()
            for key in ("torn", "lost", "duplicated", "lost_inexact"):
                if counts[key]:
                    row.bad(key, "; ".join(counts["notes"]), counts[key])
            row.counts["received"] += counts["received"]
        recv.close()
        send.close()
        ex = ctx.Process(target=workers.exchange, args=(
            d.socket, f"chaos.daemon.check.{row.counts['trials']}", row.mode, CAPACITY))
        ex.start()
        ex.join(30)
        if ex.exitcode != 0:
            row.bad("wedged", f"exchange after restart: exit code {ex.exitcode}")
            kill(ex)
        row.counts["trials"] += 1


def _request(d: Daemon, op: str) -> dict:
    """One request on a client of its own (the daemon kind restarts the daemon, which
    invalidates every client of its predecessor)."""
    client = DaemonClient(d.socket)
    try:
        return client.request(op)
    finally:
        client.close()


def _client_pids(d: Daemon) -> set[int]:
    try:
        return {c["pid"] for c in _request(d, "stat")["clients"]}
    except ShimmyError:
        return set()


def _unowned_objects(d: Daemon) -> list[str]:
    """Objects of this daemon's prefix that belong to none of its live channels: what a sweep
    missed.  (A client of the killed daemon may legitimately have opened a channel on the new
    one by now, under the same name: channel names hash to object names.)"""
    try:
        before = _request(d, "list")["channels"]
        objects = d.objects()
        after = _request(d, "list")["channels"]
    except ShimmyError as exc:
        return [f"list failed: {exc}"]
    owned = tuple(c["shm"].lstrip("/") for c in before + after)
    return [o for o in objects if not (o.startswith(owned) or o[4:].startswith(owned))]


def _stream_entry(sock: str, name: str) -> dict | None:
    for st in get_client(sock).request("list").get("streams") or []:
        if st["name"] == name:
            return st
    return None


def _never_opened(sock: str, name: str, role: str) -> bool:
    """The killed end died before the daemon registered it (nothing to wait for)."""
    entry = _stream_entry(sock, name)
    return entry is not None and entry[role] is None


class _StreamEnd:
    """The surviving end of a stream trial: one read (``writer_killed``) or write of the
    checkable byte stream per ``step()``; ``pos`` counts the bytes read or written."""

    def __init__(self, row: Row, end, writer_killed: bool, rng: random.Random):
        self.row, self.end, self.reading, self.rng = row, end, writer_killed, rng
        self.pos = 0

    def step(self) -> bool | None:
        """True when the step timed out; None when the trial must stop (a clean EOF)."""
        if self.reading:
            try:
                data = self.end.read(65536, timeout=0.005)
            except shimmy.ReceiveTimeout:
                return True
            if not data:
                self.row.bad("errors", "clean EOF from a killed writer")
                return None
            if data != payloads.stream_bytes(self.pos, len(data)):
                self.row.bad("torn", f"stream bytes at {self.pos}")
            self.pos += len(data)
            self.row.counts["received"] += len(data)
            return False
        n = self.rng.randint(1, 5000)
        try:
            self.end.write(payloads.stream_bytes(self.pos, n), timeout=0.005)
        except shimmy.BackpressureTimeout as exc:
            self.pos += getattr(exc, "written", 0)
            return True
        self.pos += n
        return False


def row_stream(ctx, row: Row, d: Daemon, trials: int, end: float, rng: random.Random) -> None:
    """Even trials kill the writer (this process reads), odd ones the reader (this process
    writes); the survivor must see StreamBroken within 5 s of the kill."""
    while row.counts["trials"] < trials and time.monotonic() < end:
        i = row.counts["trials"]
        name = f"chaos.stream.{i}"
        stream = shimmy.Stream(name, daemon=d.socket, capacity=STREAM_CAPACITY)
        writer_killed = i % 2 == 0
        victim_role = "writer" if writer_killed else "reader"
        kill_at = time.monotonic() + rng.uniform(0, 0.15)
        if writer_killed:
            survivor = _StreamEnd(row, stream.reader(), True, rng)
            victim = ctx.Process(target=workers.stream_write,
                                 args=(d.socket, name, STREAM_CAPACITY, rng.random()))
        else:
            survivor = _StreamEnd(row, stream.writer(), False, rng)
            victim = ctx.Process(target=workers.stream_read,
                                 args=(d.socket, name, STREAM_CAPACITY))
        victim.start()
        broken, deadline = False, None
        while True:
            if deadline is None and time.monotonic() >= kill_at:
                kill(victim, row)
                deadline = time.monotonic() + 5
            try:
                timed_out = survivor.step()
            except shimmy.StreamBroken:
                broken = True
                break
            if timed_out is None:
                break
            if timed_out and deadline is not None and (
                    time.monotonic() > deadline or _never_opened(d.socket, name, victim_role)):
                break
        entry = _stream_entry(d.socket, name)
        if not broken and entry is not None and entry[victim_role] is not None:
            row.bad("wedged", f"the {'reader' if writer_killed else 'writer'} saw no "
                              f"StreamBroken 5 s after the {victim_role} died: {entry}")
        survivor.end.close()
        if not writer_killed and entry is not None and entry["reader"] is None:
            # The reader died before it opened: the stream keeps what was written for the
            # reader that comes (by design).  Be that reader, so the stream ends and is freed
            # (else every such trial would hold a stream, against the tenant's quota).
            try:
                with stream.reader(timeout=5) as late:
                    while late.read(65536, timeout=5):
                        pass
            except (shimmy.StreamBroken, shimmy.ShimmyError):
                pass
            broken = True
        if broken:
            deadline = time.monotonic() + 2
            while _stream_entry(d.socket, name) is not None and time.monotonic() < deadline:
                time.sleep(0.01)
            if _stream_entry(d.socket, name) is not None:
                row.bad("stale_objects", f"stream {name} not freed after both ends ended")
        if not d.alive():
            row.bad("daemon_deaths", "daemon exited")
            break
        row.counts["trials"] += 1


RUNNERS = {"publisher": row_publisher, "subscriber": row_subscriber, "daemon": row_daemon,
           "stream": row_stream, "group": row_group}


def run_row(ctx, kind: str, mode: str, trials: int, seconds: float, seed: int) -> dict:
    row = Row(kind, mode)
    if kind in peer.KINDS:
        try:
            peer.run(row, trials, time.monotonic() + seconds, random.Random(seed))
        except Exception as exc:   # a bug in a row: record it, go on with the others
            row.bad("errors", f"{type(exc).__name__}: {exc}")
        return row.result()
    d = Daemon()
    try:
        d.start()
        RUNNERS[kind](ctx, row, d, trials, time.monotonic() + seconds, random.Random(seed))
    except Exception as exc:   # a bug in a row: record it, go on with the others
        row.bad("errors", f"{type(exc).__name__}: {exc}")
    finally:
        if kind != "daemon" and d.proc is not None and not d.alive():
            row.bad("daemon_deaths", f"daemon exit code {d.proc.returncode}")
        d.stop()
        left = d.objects()
        if left:
            row.bad("stale_objects", f"left after the daemon stopped: {left}", len(left))
        shutil.rmtree(d.dir, ignore_errors=True)
    return row.result()


def run_rows_in_processes(plan, args, seed: int) -> list[dict]:
    """Each row in a process of its own (``python -m tests.chaos.crash`` for that one row),
    ``args.jobs`` at a time: rows share nothing (a daemon or pair of nodes each), so this
    changes only how loaded the machine is while they run.  Row i keeps its seed (seed + i)."""
    tmp = tempfile.mkdtemp(prefix="shimmy-chaos-rows-")
    started = time.monotonic()
    waiting = list(enumerate(plan))
    running: dict[int, subprocess.Popen] = {}
    rows: dict[int, dict] = {}
    try:
        while waiting or running:
            while waiting and len(running) < args.jobs:
                i, (kind, mode) = waiting.pop(0)
                # the time left, split evenly between the waves of ``jobs`` rows still to
                # start (a row that ends early leaves its time to the later ones)
                waves = -(-(len(waiting) + 1) // args.jobs)
                share = (args.max_seconds - (time.monotonic() - started)) / waves
                running[i] = subprocess.Popen(
                    [sys.executable, "-m", "tests.chaos.crash", "--trials", str(args.trials),
                     "--kinds", kind, "--modes", mode if mode != "-" else MODES[0],
                     "--max-seconds", str(share), "--seed", str(seed + i),
                     "--json", os.path.join(tmp, f"{i}.json")],
                    stdout=subprocess.DEVNULL)
            for i, proc in list(running.items()):
                if proc.poll() is None:
                    continue
                del running[i]
                kind, mode = plan[i]
                try:
                    with open(os.path.join(tmp, f"{i}.json")) as fh:
                        rows[i] = json.load(fh)["rows"][0]
                except (OSError, ValueError, IndexError):
                    rows[i] = Row(kind, mode).result()
                    rows[i]["errors"] = 1
                    rows[i]["notes"] = [f"the row's process exited with {proc.returncode}, "
                                        f"no report"]
            time.sleep(0.2)
    finally:
        for proc in running.values():
            proc.kill()
            proc.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return [rows[i] for i in range(len(plan))]


def table(rows: list[dict]) -> str:
    cols = ["kind", "mode", "trials", "received", *ZERO_KEYS, "seconds"]
    cells = [cols] + [[str(r[c]) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(cols))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths, strict=True))
                     for line in cells)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.chaos.crash", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=1000, help="kills per row (default 1000)")
    p.add_argument("--kinds", default=",".join(KINDS), help="comma-separated: " + ",".join(KINDS))
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated: " + ",".join(MODES))
    p.add_argument("--max-seconds", type=float, default=600.0,
                   help="overall time bound, split evenly between rows (default 600)")
    p.add_argument("--jobs", type=int, default=1,
                   help="rows run at once, each in a process of its own (default 1)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--json", dest="json_path", help="write the results here")
    args = p.parse_args(argv)
    kinds = [k for k in args.kinds.split(",") if k]
    modes = [m for m in args.modes.split(",") if m]
    bad = [k for k in kinds if k not in KINDS] + [m for m in modes if m not in MODES]
    if bad:
        p.error(f"unknown kind or mode: {bad}")
    if args.jobs < 1:
        p.error("--jobs must be at least 1")
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    plan = [(k, m) for k in kinds for m in (modes if k != "stream" else ["-"])]
    started = time.monotonic()
    if args.jobs > 1 and len(plan) > 1:
        rows = run_rows_in_processes(plan, args, seed)
    else:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["tests.chaos.workers"])
        rows = []
        for i, (kind, mode) in enumerate(plan):
            left = args.max_seconds - (time.monotonic() - started)
            share = left / (len(plan) - i)
            rows.append(run_row(ctx, kind, mode, args.trials, share, seed + i))
            print(f"{kind}/{mode}: {rows[-1]['trials']} trials in {rows[-1]['seconds']} s",
                  file=sys.stderr, flush=True)
    report = {"seed": seed, "trials": sum(r["trials"] for r in rows),
              "seconds": round(time.monotonic() - started, 1), "rows": rows}
    print(table(rows))
    for r in rows:
        for note in r["notes"]:
            print(f"  {r['kind']}/{r['mode']} {note}")
    if args.json_path:
        with open(args.json_path, "w") as fh:
            json.dump(report, fh, indent=2)
    return 1 if any(r[k] for r in rows for k in ZERO_KEYS) else 0


if __name__ == "__main__":
    sys.exit(main())
