"""The peer-daemon rows of the crash matrix: SIGKILL one daemon of a two-node pair mid-stream,
restart it on the same socket, and count what must never happen.

Two nodes, A and B, each a real daemon in its own IPC and mount namespace with a private
/dev/shm (the harness of tests/test_peer_mirror.py: ``Node``), peered over 127.0.0.1.  One
long-running publisher process on A publishes self-checking messages (tests/chaos/payloads.py)
whose payload carries the publisher's own count: the index of each ``publish()`` that returned.
One long-running subscriber process on B receives them through B's replica.  Both live through
every trial of a row (one trial = one kill and its recovery); the pair is set up again only
every ``RECYCLE`` trials, or after a trial that left it in doubt.  The daemons run with
``peer_backoff_max`` 0.25 s (default 2 s), so a trial costs the recovery, not the redial wait.

peer-source   A's daemon (the publishing node's) is SIGKILLed at a random instant (0-300 ms
              into the trial) and restarted at once on the same socket.  The publisher goes on
              as an application would: when a publish is refused (its ring retired by the
              restart's sweep, or the daemon gone) it calls ``Channel.reopen()`` once A's daemon
              answers and has its peer link back (the recipe of docs/peering.md: the publisher
              carries what its old ring held into the new one, and the restarted daemon
              continues B's replica stream from it), and publishes the failed index again.
              What it published into the old ring after the kill counts: its ``publish()``
              returned.  (An SDK that reopens by itself is measured the same way.)
peer-replica  B's daemon (the subscribing node's) is SIGKILLed at a random instant and restarted.
              In both rows a quarter of the trials (``AGAIN``) kill the restarted daemon once
              more, 0-200 ms after it came back (link redial, directory exchange, the replica's
              stream continued or started), and restart it again.
              B's subscriber loses its subscription with its daemon (a restart is a clean slate
              on that node: docs/peering.md, row 9) and subscribes again once B answers.

Recovery: once the killed daemon is back, the publisher is asked the index its next publish
gets; the trial has recovered when B's subscriber received that index or a later one (so the
exchange goes on through the restarted daemon; for peer-replica also: A's publisher did not
stop), on its original subscription with ``status`` back at ``up`` (peer-source), or on a new
subscription (peer-replica).

What is counted, per trial (``received``: messages checked; the counts must all be 0):

torn           a payload whose checksum fails.
lost           reliable: an index missing between two consecutive messages of one subscription
               (by the payload's index, the publisher's count, not the ring's seq).  For a
               source kill this means: every message whose ``publish()`` returned, in the old
               ring or the new one, reaches the remote subscriber (the old ring still holds
               whatever its dead mirror had not sent: the mirror's reliable slot kept it).
duplicated     an index not above the one before it (in one subscription).
lost_inexact   lossy: ``Message.lost`` differs from the gap in the publisher's indices between
               two consecutive messages of one subscription.  For a source kill, the messages
               that died with the old ring (committed, not mirrored, overwritten before the
               publisher moved on) must be in ``lost``.
wedged         no recovery (above) within ``RESUME_S``; peer-source also counts a remote
               subscription that ended (it must be kept, status down -> up).
stale_objects  shared memory of the killed daemon's prefix, in its node's /dev/shm, that belongs
               to no live channel after the restart's sweep; and anything left in either node's
               /dev/shm after the row's daemons stopped.
daemon_deaths  the survivor daemon (B for peer-source, A for peer-replica) exited; the one to be
               killed had exited before the kill; or it failed to restart.
errors         anything unexpected (a worker process died, a bug in the row).

A subscription's first message sets its starting point: a fresh replica (peer-replica) starts
at the source's tail, so the gap between two subscriptions is not loss.

Diagnostics: ``SHIMMY_CHAOS_LOG_LEVEL`` sets the daemons' ``--log-level`` (default warning;
``info`` logs every mirror start, continued and carried stream).  With ``SHIMMY_CHAOS_KEEP``
set to a folder, a trial that counted torn, lost, duplicated, inexact or wedged keeps there
both daemons' logs, their ``stat`` and the pair's journal (each kill and restart, where the
publisher stood, every report that counted, with times), and the row's notes say where; every
pair's logs and journal are kept there too when it is closed (``pair-*``).
"""

from __future__ import annotations

import json
import os
import queue
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

from shimmy.daemon.segments import daemon_id
from shimmy.errors import ShimmyError

from . import payloads, workers

KINDS = ("peer-source", "peer-replica")
CAPACITY = 65536     # frames of up to 616 bytes: the ring wraps every ~200 messages
MAX_SIZE = 600
PACE_EVERY = 20      # the publisher sleeps 1 ms after every PACE_EVERY messages (CPU is shared)
RESUME_S = 20.0      # bound on a trial's recovery (more than the peer_hold of 10 s)
AGAIN = 0.25         # the share of trials that kill the restarted daemon a second time
RECYCLE = 250        # trials per pair of nodes (a node's namespace holder lives an hour)
LOG_LEVEL = os.environ.get("SHIMMY_CHAOS_LOG_LEVEL", "warning")   # the daemons' --log-level
KEEP = os.environ.get("SHIMMY_CHAOS_KEEP")    # a folder: keep the logs of trials that counted
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# -- the two long-running client processes (run inside a node's namespaces) ---------------------
def _open(sock: str, name: str, mode: str, linked: bool = False, again=None):
    """Open ``name`` on our daemon, waiting (bounded) for it to answer after a restart and, if
    ``linked``, to have its peer link back.  ``again``: a Channel to reopen instead
    (``Channel.reopen``, the publisher's recipe after a restart of its daemon, docs/peering.md:
    it carries its stream into the new ring, and the restarted daemon continues the replica's
    stream from it)."""
    import shimmy
    from shimmy.sdk.client import DaemonClient
    deadline = time.monotonic() + 60
    while True:
        try:
            if linked:
                c = DaemonClient(sock)
                try:
                    up = c.request("stat")["peer"]["links"]
                finally:
                    c.close()
                if not up:
                    raise ConnectionError("no peer link yet")
            if again is not None:
                again.reopen()
                return again
            return shimmy.Channel(name, daemon=sock, mode=mode, capacity=CAPACITY)
        except (shimmy.DaemonUnavailable, shimmy.ChannelClosed, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def worker_pub(sock: str, name: str, mode: str) -> None:
    """Publish self-checking messages for ever, as an application would: the payload's index is
    our count of returned publishes.  When a publish is refused (``ChannelClosed``: the ring was
    retired by the restarted daemon's sweep; ``DaemonUnavailable``), reopen the channel once
    our daemon has its peer link back (carrying our stream over), and publish the failed index
    again.  A thread answers
    each line on stdin with ``at <index>``: the index the next publish gets.  Prints ``open``
    after the first open; SIGKILLed at the end of the row."""
    import shimmy
    at = [0]

    def answer() -> None:
        try:
            for _ in sys.stdin:
                print("at", at[0], flush=True)
        except BrokenPipeError:
            pass
        os._exit(0)   # the row is gone (our stdin closed): so are we
    threading.Thread(target=answer, daemon=True).start()
    ch = _open(sock, name, mode, linked=True)
    print("open", flush=True)
    while True:
        i = at[0]
        try:
            ch.publish(payloads.make(i, MAX_SIZE), timeout=0.25)
        except shimmy.BackpressureTimeout:
            continue            # not published: the remote is slow, or our daemon is gone
        except ShimmyError:
            ch = _open(sock, name, mode, linked=True, again=ch)
            continue
        at[0] = i + 1
        if at[0] % PACE_EVERY == 0:
            time.sleep(0.001)


def worker_sub(sock: str, name: str, mode: str) -> None:
    """Subscribe on our node (again after our daemon restarts) and check every message by its
    payload index.  Answers ``report`` on stdin with one JSON line: the counts since the last
    report, the last index, the status, and how many subscriptions it has had."""
    import shimmy
    check = workers.Checker(mode, by_payload=True)
    subs, ch, sub = 0, None, None
    last, last_sub_index = -1, -1     # last index received; that of the current subscription
    statuses: list[str] = []
    while True:
        if sub is None:
            ch = _open(sock, name, mode)
            try:
                sub = ch.subscribe()
            except (shimmy.DaemonUnavailable, shimmy.ChannelClosed):
                continue   # our daemon was killed again between the open and the subscribe
            subs += 1
            check.prev, check.prev_lost, last_sub_index = None, 0, -1
        try:
            got = check.drain(sub, 500)
            if not got:
                try:
                    data = sub.receive_bytes(timeout=0.02)
                    check.see(sub.last_seq, data, sub.lost)
                    got = 1
                except shimmy.ReceiveTimeout:
                    pass
            if got and check.prev is not None:
                last = last_sub_index = check.prev
            status = sub.status
        except ShimmyError:
            try:
                assert ch is not None
                ch.close()
            except ShimmyError:
                pass
            ch = sub = None
            status = "closed"
        if not statuses or statuses[-1] != status:
            statuses.append(status)
        if select.select([sys.stdin], [], [], 0)[0]:
            if not sys.stdin.readline():
                return
            print(json.dumps({**check.counts, "notes": check.notes, "last": last,
                              "sub_last": last_sub_index, "status": status, "subs": subs,
                              "statuses": statuses}), flush=True)
            for key in check.counts:
                check.counts[key] = 0
            check.notes.clear()
            statuses = [status]


# -- the rows ------------------------------------------------------------------------------------
class Lines:
    """The stdout lines of a worker process, read by a thread into a queue."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self.q: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.q.put(line)

    def next(self, timeout: float) -> str | None:
        try:
            return self.q.get(timeout=max(timeout, 0))
        except queue.Empty:
            return None


class Pair:
    """Nodes A (peer listener, publisher) and B (dials A, subscriber) and the two workers."""

    def __init__(self, mode: str, name: str):
        from shimmy.daemon.peer.auth import random_key_file
        from tests.test_peer_mirror import Node, free_port, wait_for
        self.nodes: list = []
        self.procs: list[subprocess.Popen] = []
        self.tmp = tempfile.mkdtemp(prefix="shimmy-chaos-peer-")
        key = os.path.join(self.tmp, "cluster.key")
        random_key_file(key)
        port = free_port()
        # the redial backoff capped at 0.25 s (default 2 s): a trial then costs the recovery,
        # not the wait for the next dial
        quiet = ("--log-level", LOG_LEVEL, "--peer-backoff-max", "0.25")
        self.a = Node("A", key, *quiet, "--peer-listen", f"127.0.0.1:{port}")
        self.nodes.append(self.a)
        self.b = Node("B", key, *quiet, "--peer", f"127.0.0.1:{port}")
        self.nodes.append(self.b)
        try:
            self.a.start()
            self.b.start()
            wait_for("link A-B", lambda: self.a.peer()["links"] and self.b.peer()["links"])
            self.pub = Lines(self._worker(self.a, "pub", name, mode))
            if self.pub.next(30) != "open\n":
                raise RuntimeError("the publisher did not open the channel within 30 s")
            self.sub = self._worker(self.b, "sub", name, mode)
            self.sub_lines = Lines(self.sub)
            if self.report(30) is None:
                raise RuntimeError("the subscriber did not answer within 30 s")
        except BaseException:
            self.close(None)
            raise

    def _worker(self, node, role: str, name: str, mode: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [*node.enter(), sys.executable, "-m", "tests.chaos.peer", role, node.socket, name,
             mode], env={**os.environ, "PYTHONPATH": ROOT},   # nsenter leaves us in "/"
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.procs.append(proc)
        return proc

    def published(self, timeout: float = 10.0) -> int | None:
        """The index the publisher's next publish gets (None: no answer)."""
        assert self.pub.proc.stdin is not None
        try:
            self.pub.proc.stdin.write("where\n")
            self.pub.proc.stdin.flush()
        except OSError:
            return None
        line = self.pub.next(timeout)
        return int(line.split()[1]) if line and line.startswith("at ") else None

    def report(self, timeout: float = 10.0) -> dict | None:
        assert self.sub.stdin is not None
        try:
            self.sub.stdin.write("report\n")
            self.sub.stdin.flush()
        except OSError:
            return None
        line = self.sub_lines.next(timeout)
        return json.loads(line) if line else None

    @staticmethod
    def shm(node) -> list[str]:
        """The node's /dev/shm objects of its daemon's prefix (seen through the namespace
        holder's root)."""
        prefix = f"shimmy.{daemon_id(node.socket)}."
        path = f"/proc/{node.holder.pid}/root/dev/shm"
        return sorted(e for e in os.listdir(path)
                      if e.startswith(prefix) or e.startswith("sem." + prefix))

    def close(self, row) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait(10)
        for node in self.nodes:
            node.stop()
            if row is not None and node.proc is not None and node.proc.returncode not in (0, None):
                row.bad("daemon_deaths", f"node {node.name} stopped with {node.proc.returncode}")
            left = self.shm(node) if node.holder.poll() is None else []
            if left and row is not None:
                row.bad("stale_objects", f"left on {node.name} after it stopped: {left}", len(left))
            node.close()
        if KEEP and self.nodes:
            _keep_logs(self, tempfile.mkdtemp(prefix="pair-", dir=KEEP))
        for node in self.nodes:
            shutil.rmtree(node.dir, ignore_errors=True)
        shutil.rmtree(self.tmp, ignore_errors=True)


def _unowned(node) -> list[str]:
    """Objects of the node's daemon prefix that belong to none of its live channels (what the
    restart's sweep missed); the publisher may already have opened the name again."""
    try:
        before = node.request("list")["channels"]
        objects = Pair.shm(node)
        after = node.request("list")["channels"]
    except ShimmyError as exc:
        return [f"list failed: {exc}"]
    owned = tuple(c["shm"].lstrip("/") for c in before + after)
    return [o for o in objects if not (o.startswith(owned) or o[4:].startswith(owned))]


def _journal(pair, text: str) -> None:
    """One line of the pair's journal (what the row did when, to read beside the daemons'
    logs; kept with them by ``_keep``)."""
    now = time.time()
    with open(os.path.join(pair.tmp, "journal.txt"), "a") as fh:
        fh.write(f"{time.strftime('%H:%M:%S', time.localtime(now))}.{int(now * 1000) % 1000:03d}"
                 f" {text}\n")


def _bad(row) -> int:
    return sum(row.counts[k] for k in ("torn", "lost", "duplicated", "lost_inexact", "wedged"))


def _keep_logs(pair, dest: str, stat: bool = False) -> None:
    """Copy both daemons' logs (and, with ``stat``, their ``stat``) and the pair's journal
    into ``dest``."""
    for node in pair.nodes:
        shutil.copy(os.path.join(node.dir, "daemon.log"), os.path.join(dest, f"{node.name}.log"))
        if stat:
            try:
                out = node.stat()
            except (ShimmyError, OSError) as exc:
                out = {"error": str(exc)}
            with open(os.path.join(dest, f"{node.name}.stat.json"), "w") as fh:
                json.dump(out, fh, indent=1, default=str)
    if os.path.exists(os.path.join(pair.tmp, "journal.txt")):
        shutil.copy(os.path.join(pair.tmp, "journal.txt"), os.path.join(dest, "journal.txt"))


def _keep(row, pair) -> None:
    """A trial counted something: keep the daemons' logs, their ``stat`` and the journal under
    ``$SHIMMY_CHAOS_KEEP`` (when set), and say where in the row's notes."""
    if not KEEP:
        return
    dest = tempfile.mkdtemp(prefix=f"{row.kind}-{row.mode}-trial{row.counts['trials']}-",
                            dir=KEEP)
    _keep_logs(pair, dest, stat=True)
    row.notes.append(f"trial {row.counts['trials']}: the daemons' logs are kept in {dest}")


def _add(row, rep: dict) -> None:
    for key in ("torn", "lost", "duplicated", "lost_inexact"):
        if rep[key]:
            row.bad(key, "; ".join(rep["notes"]), rep[key])
    row.counts["received"] += rep["received"]


def _trial(row, pair: Pair, name: str, rng: random.Random) -> bool:
    """One kill and its recovery; False when the pair is not to be trusted for another trial
    (anything counted as wedged, a death, a worker gone): the row sets up a new pair."""
    wedged = row.counts["wedged"]
    bad = _bad(row)
    _journal(pair, f"trial {row.counts['trials']} begins")
    source = row.kind == "peer-source"
    victim, survivor = (pair.a, pair.b) if source else (pair.b, pair.a)
    time.sleep(rng.uniform(0, 0.3))
    before = pair.report()
    if before is None:
        row.bad("errors", "subscriber process gone")
        return False
    _add(row, before)
    if not victim.alive():
        row.bad("daemon_deaths", f"{victim.name} exited before the kill")
    # A quarter of the trials kill the restarted daemon once more, 0-200 ms after it came
    # back: while the link is redialled, the directory exchanged, the stream continued.
    for k in range(2 if rng.random() < AGAIN else 1):
        if k:
            time.sleep(rng.uniform(0, 0.2))
        _journal(pair, f"kill {victim.name} ({k})")
        victim.stop(signal.SIGKILL)
        try:
            victim.start()
            _journal(pair, f"{victim.name} restarted")
        except RuntimeError as exc:
            row.bad("daemon_deaths", f"restart of {victim.name} failed: {exc}")
            return False
    stale = _unowned(victim)
    if stale:
        row.bad("stale_objects", f"on {victim.name} after the restart's sweep: {stale}", len(stale))
    deadline = time.monotonic() + RESUME_S
    # every index from here on was published after the killed daemon was back
    after = pair.published()
    if after is None:
        row.bad("errors", "the publisher did not say where it is")
        return False
    _journal(pair, f"before {json.dumps(before)}; publisher at {after}")
    subs0, resumed, rep = before["subs"], False, before
    while time.monotonic() < deadline:
        rep = pair.report()
        if rep is None:
            break
        if any(rep[k] for k in ("torn", "lost", "duplicated", "lost_inexact")):
            _journal(pair, f"report {json.dumps(rep)}")
        _add(row, rep)
        if source:
            if rep["subs"] != subs0:
                row.bad("wedged", f"the remote subscription ended: statuses {rep['statuses']}")
                subs0 = rep["subs"]
            resumed = rep["sub_last"] >= after and rep["status"] == "up"
        else:
            resumed = rep["subs"] > subs0 and rep["sub_last"] >= after
        if resumed:
            break
        time.sleep(0.02)
    if not resumed:
        row.bad("wedged", f"no recovery within {RESUME_S} s after the kill of {victim.name}: "
                          f"subscriber {rep}, publisher at {after} after the restart")
    if _bad(row) != bad:
        _journal(pair, f"trial counted {json.dumps({k: v for k, v in row.counts.items() if v})}")
        _keep(row, pair)
    if not survivor.alive():
        row.bad("daemon_deaths", f"survivor {survivor.name} exited")
        return False
    for p in pair.procs:
        if p.poll() is not None:
            row.bad("errors", f"worker {p.args[-4]} exited with {p.returncode}")
            return False
    return row.counts["wedged"] == wedged


def run(row, trials: int, end: float, rng: random.Random) -> None:
    """Run ``trials`` kills of ``row.kind`` (a new pair of nodes every RECYCLE trials, and
    after a trial that left the pair in doubt)."""
    n = 0
    while row.counts["trials"] < trials and time.monotonic() < end:
        name = f"chaos/{row.kind}/{row.mode}/{n}"
        n += 1
        pair = Pair(row.mode, name)
        try:
            for _ in range(RECYCLE):
                if row.counts["trials"] >= trials or time.monotonic() >= end:
                    break
                ok = _trial(row, pair, name, rng)
                row.counts["trials"] += 1
                if not ok:
                    break
            last = pair.report()
            if last is not None:
                _add(row, last)
        finally:
            pair.close(row)


if __name__ == "__main__":
    # (SIGPIPE stays ignored, as Python sets it: with its default action a worker whose
    # daemon was SIGKILLed in the middle of a request died of it, silently, instead of getting
    # DaemonUnavailable: the row's rare "publisher did not say where it is".)
    role, sock, channel, mode = sys.argv[1:5]
    (worker_pub if role == "pub" else worker_sub)(sock, channel, mode)
