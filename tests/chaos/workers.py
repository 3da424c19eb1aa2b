"""The processes the crash matrix kills or checks with (started from a fork server, so each
costs a fork, not an interpreter start).  Each talks to the daemon through the public SDK; the
few internals used (the writer's next seq, to build a self-checking payload before publishing)
are named where used."""

from __future__ import annotations

import random
import time

import shimmy
from shimmy.errors import ShimmyError
from shimmy.sdk.client import get_client

from . import payloads


class Checker:
    """Checks one subscriber's stream: payloads intact, order, loss (reliable) and the
    exactness of ``lost`` (lossy).  ``counts`` holds what must stay zero, plus ``received``."""

    def __init__(self, mode: str, by_payload: bool = False):
        self.reliable = mode == "reliable"
        # by_payload: order and loss follow the publisher's own count carried in the payload,
        # not the ring's seq (a message relayed to another node through a restarted source)
        self.by_payload = by_payload
        self.prev: int | None = None
        self.prev_lost = 0
        self.counts = {"received": 0, "torn": 0, "lost": 0, "duplicated": 0, "lost_inexact": 0}
        self.notes: list[str] = []

    def see(self, seq: int, data, lost_total: int) -> None:
        c = self.counts
        c["received"] += 1
        if self.by_payload:
            index = payloads.index(data)
            if index is None:
                c["torn"] += 1
                self._note(f"ring seq {seq}: torn or foreign payload")
                return
            seq = index
        why = payloads.check(data, seq)
        if why:
            c["torn"] += 1
            self._note(why)
        lost = lost_total - self.prev_lost
        self.prev_lost = lost_total
        if self.prev is not None:
            if seq <= self.prev:
                c["duplicated"] += 1
                self._note(f"seq {seq} after {self.prev}")
            elif self.reliable and seq != self.prev + 1:
                c["lost"] += seq - self.prev - 1
                self._note(f"gap {self.prev} -> {seq}")
            elif not self.reliable and lost != seq - self.prev - 1:
                c["lost_inexact"] += 1
                self._note(f"lost {lost} between {self.prev} and {seq}")
        self.prev = seq

    def _note(self, text: str) -> None:
        if len(self.notes) < 5:
            self.notes.append(text)

    def drain(self, sub, limit: int = 100_000) -> int:
        """Receive what is committed now (copy path in lossy mode, zero copy in reliable)."""
        n = 0
        while n < limit:
            if self.reliable:
                msg = sub.receive_nowait()
                if msg is None:
                    return n
                self.see(msg.seq, msg.data, sub.lost)
            else:
                try:
                    data = sub.receive_bytes(timeout=0)
                except shimmy.ReceiveTimeout:
                    return n
                self.see(sub.last_seq, data, sub.lost)
            n += 1
        return n


class GroupChecker:
    """Checks one subscription of a publisher group: a :class:`Checker` per publisher id, fed
    that publisher's own seq (its count of returned publishes, from 0) and its own ``lost``.
    Payloads are made for ``publisher << 32 | seq`` (see ``group_index``), so a frame delivered
    under the wrong publisher counts as torn.  ``counts`` sums the checkers'."""

    def __init__(self, mode: str, from_start: bool = True):
        self.mode = mode
        self.reliable = mode == "reliable"
        # from_start: the subscription was there before every publisher it will see, so each
        # publisher's first message must be its seq 0 (lossy: its lost must say what it missed)
        self.from_start = from_start
        self.by_pub: dict[int, Checker] = {}
        self.lost_total: dict[int, int] = {}

    def checker(self, pub: int) -> Checker:
        check = self.by_pub.get(pub)
        if check is None:
            check = self.by_pub[pub] = Checker(self.mode)
            if self.from_start:
                check.prev = group_index(pub, 0) - 1
        return check

    def last(self, pub: int) -> int:
        """The last seq of ``pub`` received (-1: none)."""
        check = self.by_pub.get(pub)
        return -1 if check is None or check.prev is None else check.prev - group_index(pub, 0)

    def received(self, pub: int) -> int:
        check = self.by_pub.get(pub)
        return 0 if check is None else check.counts["received"]

    @property
    def counts(self) -> dict:
        keys = ("received", "torn", "lost", "duplicated", "lost_inexact")
        return {k: sum(c.counts[k] for c in self.by_pub.values()) for k in keys}

    @property
    def notes(self) -> list[str]:
        return [f"publisher {pub}: {n}" for pub, c in self.by_pub.items() for n in c.notes][:5]

    def take_counts(self) -> dict:
        """The counts so far, then zero them (what ``last`` answers stays)."""
        out = {**self.counts, "notes": self.notes}
        for c in self.by_pub.values():
            c.counts = dict.fromkeys(c.counts, 0)
            c.notes = []
        return out

    def drain(self, sub, limit: int = 100_000) -> int:
        """As ``Checker.drain``: zero copy in reliable mode, the copy path in lossy mode."""
        n = 0
        while n < limit:
            if self.reliable:
                msg = sub.receive_nowait()
                if msg is None:
                    return n
                pub, seq, data = msg.publisher, msg.seq, msg.data
                total = self.lost_total[pub] = self.lost_total.get(pub, 0) + msg.lost
            else:
                try:
                    data = sub.receive_bytes(timeout=0)
                except shimmy.ReceiveTimeout:
                    return n
                pub, seq = sub.last_publisher, sub.last_seq
                total = sub.lost_by_publisher()[pub]
            self.checker(pub).see(group_index(pub, seq), data, total)
            n += 1
        return n


def group_index(pub: int, seq: int) -> int:
    """The payload index of message ``seq`` of group publisher ``pub``."""
    return pub << 32 | seq


def _publisher(sock: str, name: str, mode: str, capacity: int, max_size: int,
               max_publishers: int | None = None):
    ch = shimmy.Channel(name, daemon=sock, mode=mode, capacity=capacity,
                        max_publishers=max_publishers)
    deadline = time.monotonic() + 10
    while True:
        try:
            ch._become_publisher()   # internal: the role now, so _writer._seq is known
            return ch
        except ShimmyError as exc:
            # the daemon frees a killed publisher's place when it sees its session close
            busy = "already has a publisher" in str(exc) or "publishers already" in str(exc)
            if not busy or time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def publish(sock: str, name: str, mode: str, capacity: int, max_size: int, count: int,
            seed: int, pause_every: int = 0, max_publishers: int | None = None,
            report=None) -> None:
    """Publish self-checking messages (``count`` < 0: until killed), a third through loan().
    Exit code 0 when done, or when the daemon retired the channel / went away.  With
    ``max_publishers`` > 1 (a group member): payloads are made for ``group_index``, and
    ``report`` (a shared array of 2 int64) gets the publisher id, then after each returned
    publish the count of returned publishes."""
    rng = random.Random(seed)
    try:
        ch = _publisher(sock, name, mode, capacity, max_size, max_publishers)
        writer = ch._writer
        assert writer is not None
        base = group_index(ch.publisher_id, 0) if max_publishers else 0
        if report is not None:
            report[0] = ch.publisher_id
        i = 0
        while count < 0 or i < count:
            seq = writer._seq               # internal: the seq this message will get
            data = payloads.make(base | seq, max_size)
            if rng.random() < 0.33:
                with ch.loan(len(data)) as buf:
                    buf[:] = data
            elif ch.publish(data) != seq:
                raise SystemExit(f"publish returned an unexpected seq (expected {seq})")
            i += 1
            if report is not None:
                report[1] = seq + 1
            if pause_every and i % pause_every == 0:
                time.sleep(0.001)
        ch.close()
    except (shimmy.ChannelClosed, shimmy.DaemonUnavailable):
        pass


def subscribe(sock: str, name: str, mode: str, capacity: int, seconds: float, conn=None) -> None:
    """Receive and check for ``seconds`` (or until killed, or until the channel is retired);
    send the Checker's counts on ``conn``."""
    check = Checker(mode)
    outcome = "timeout"
    try:
        ch = shimmy.Channel(name, daemon=sock, mode=mode, capacity=capacity)
        sub = ch.subscribe()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if not check.drain(sub, 1000):
                try:
                    if check.reliable:
                        msg = sub.receive(timeout=0.05)
                        check.see(msg.seq, msg.data, sub.lost)
                    else:   # the copy path: a zero-copy view may be overwritten in lossy mode
                        data = sub.receive_bytes(timeout=0.05)
                        check.see(sub.last_seq, data, sub.lost)
                except shimmy.ReceiveTimeout:
                    continue
        ch.close()
    except (shimmy.ChannelClosed, shimmy.DaemonUnavailable) as exc:
        outcome = type(exc).__name__
    except ShimmyError as exc:
        outcome = f"{type(exc).__name__}: {exc}"
    if conn is not None:
        conn.send({"outcome": outcome, **check.counts, "notes": check.notes})


def exchange(sock: str, name: str, mode: str, capacity: int, n: int = 20) -> None:
    """After a daemon restart: list, open, subscribe, publish ``n``, receive them all intact.
    Exit code 0 on success."""
    client = get_client(sock)
    client.request("list")
    ch = shimmy.Channel(name, daemon=sock, mode=mode, capacity=capacity)
    sub = ch.subscribe()
    check = Checker("reliable")
    for i in range(n):
        seq = ch.publish(payloads.make(i, 200))
        msg = sub.receive(timeout=5)
        check.see(msg.seq, msg.data, sub.lost)
        if msg.seq != seq:
            raise SystemExit(f"received seq {msg.seq}, published {seq}")
    bad = {k: v for k, v in check.counts.items() if k != "received" and v}
    if bad:
        raise SystemExit(f"exchange after restart: {bad} {check.notes}")
    ch.close()
    client.request("delete", name=name)


def stream_write(sock: str, name: str, capacity: int, seed: int) -> None:
    """Write the checkable byte stream in random chunks until killed or the reader is gone."""
    rng = random.Random(seed)
    try:
        w = shimmy.Stream(name, daemon=sock, capacity=capacity).writer()
        pos = 0
        while True:
            n = rng.randint(1, 5000)
            w.write(payloads.stream_bytes(pos, n), timeout=5)
            pos += n
    except (shimmy.StreamBroken, shimmy.ChannelClosed, shimmy.DaemonUnavailable,
            shimmy.BackpressureTimeout):
        pass


def stream_read(sock: str, name: str, capacity: int) -> None:
    """Read and check the byte stream until killed or the writer is gone."""
    try:
        r = shimmy.Stream(name, daemon=sock, capacity=capacity).reader()
        pos = 0
        while True:
            data = r.read(65536, timeout=5)
            if not data:
                return
            if data != payloads.stream_bytes(pos, len(data)):
                raise SystemExit(f"stream bytes at {pos} differ (torn)")
            pos += len(data)
    except (shimmy.StreamBroken, shimmy.ChannelClosed, shimmy.DaemonUnavailable,
            shimmy.ReceiveTimeout):
        pass
