"""The transport interface every mirror runs over.

A transport moves bytes of one source ring into the replica ring of one mirror on another node.
It knows nothing about frames, modes or loss: the mirror halves in ``mirror.py`` decide what to
send and when, so ordering, flow control, loss accounting and resume are the same whatever moves
the bytes (TCP here, RDMA in the ``rdma`` package).

Contract (the conformance suite ``tests/test_peer_transport.py`` checks it for every transport):

* ``put(start, views, guard)``: the bytes of ``views`` (at most two, split only at the ring's
  wrap point) are the stream positions ``[start, start + total)``; they land at the same ring
  offsets in the replica.  ``guard`` is a frame boundary the replica stores as its head *before*
  any byte lands (so its own lapped readers notice).  Not visible to replica readers yet.
* ``commit(tail, last, pad_until)``: everything put so far becomes visible: the replica
  (after turning ``[old tail, pad_until)`` into PAD frames when ``pad_until`` is set, for bytes the
  source found overwritten while they were being sent) stores ``last`` then ``tail``.
  Puts and commits of one transport are applied in the order they were issued.
* ``jump(position, last)``: the source no longer holds the bytes between the replica's tail
  and ``position`` (a gap): the replica moves head and tail there.  A ``put`` not followed by
  its commit (a lossy batch the source found torn) is dropped by it.
* ``put_commit(start, views, guard, tail, last)``: ``put`` then ``commit(tail, last)``; a
  transport may send both at once (reliable sources, which need no seqlock check between them).
* ``credited(consumed, replica_tail)``: a credit from the replica arrived (the link's reader
  calls it): ``credits()`` returns ``consumed`` from then on and ``on_credit`` (the mirror
  source's hook) is called with it.
* ``credits()``: the latest consumed position the replica reported (min of its live
  subscribers' positions, or its tail when it has none), or None before the first report.
* ``close()``: stop; later calls raise ``TransportClosed``.  Idempotent.

A transport may block in ``put``/``commit`` (bounded by the link timeout) and raises
``TransportClosed`` when its link is gone; the mirror then waits for a reconnect and resumes from
the replica's last committed position.
"""

from __future__ import annotations

import abc
from typing import Any, Callable, Sequence


class TransportClosed(ConnectionError):
    """The link under a transport is gone (or the transport was closed)."""


class Transport(abc.ABC):
    """Source end of one mirror's transport."""

    kind = "abstract"
    fallback: str | None = None      # why this mirror is not on RDMA (set by rdma_mirrors.py)
    on_credit: Callable[[int], None] | None = None   # the mirror source's credit hook
    _credit: int | None = None
    replica_tail = -1                # the replica's committed tail, as its last credit said

    def describe(self) -> dict:
        """Transport-specific fields for ``ls`` / ``stat`` (registration, fallback reason...)."""
        return {"fallback": self.fallback} if self.fallback else {}

    @abc.abstractmethod
    def put(self, start: int, views: Sequence[memoryview], guard: int) -> None: ...

    @abc.abstractmethod
    def commit(self, tail: int, last: int, pad_until: int = 0) -> None: ...

    def put_commit(self, start: int, views: Sequence[memoryview], guard: int, tail: int,
                   last: int) -> None:
        self.put(start, views, guard)
        self.commit(tail, last)

    @abc.abstractmethod
    def jump(self, position: int, last: int) -> None: ...

    def credited(self, consumed: int, replica_tail: int) -> None:
        """A credit arrived (the link's reader thread)."""
        self._credit = consumed
        self.replica_tail = replica_tail
        cb = self.on_credit
        if cb is not None:
            cb(consumed)

    def credits(self) -> int | None:
        return self._credit

    def relay_link(self) -> tuple[Any, int] | None:
        """The plain TCP link (``tcp.Link``) whose socket a mirror's C pump may send on itself
        (daemon/peer/relay.py) and the mirror's id on it, or None: every batch then goes through
        ``put`` and ``commit``."""
        return None

    @abc.abstractmethod
    def close(self) -> None: ...


class ReplicaSink(abc.ABC):
    """Replica end: what a transport's receiving side calls, in stream order (TCP: ``put_target``
    then ``commit``; RDMA places bytes itself: ``advance_head``, ``landed`` then ``commit``).
    ``head`` and ``tail`` are the replica's positions as it stored them."""

    head: int
    tail: int

    def land(self, buf: bytearray, r0: int, r1: int, mid: int, start: int, end: int,
             guard: int) -> int:
        """A PUT header of mirror ``mid`` was read and ``buf[r0:r1]`` are the bytes received
        after it: when they hold the whole batch and its COMMIT, put, fill and commit it at once
        and return where the next header starts; else -1, and the batch goes through
        ``put_target`` and ``commit``.  This default always says -1; MirrorReplica's C base
        (shimmy/_relaycore.c) lands the common case."""
        return -1

    @abc.abstractmethod
    def put_target(self, start: int, end: int, guard: int) -> list[memoryview]:
        """Validate a put, store the guard head, return the ring views to fill (1 or 2)."""

    @abc.abstractmethod
    def commit(self, tail: int, last: int, pad_until: int) -> None: ...

    @abc.abstractmethod
    def jump(self, position: int, last: int) -> None: ...

    @abc.abstractmethod
    def consumed(self) -> int:
        """Credits to report: min position of ACTIVE local subscribers, or tail."""

    @abc.abstractmethod
    def advance_head(self, need: int, ahead: int) -> int:
        """Store a head >= ``need`` (up to ``ahead``) before bytes land without this CPU;
        return the head stored."""

    @abc.abstractmethod
    def landed(self, end: int) -> None:
        """Bytes up to ``end`` were placed in the ring directly; accept them for the commit."""

    @abc.abstractmethod
    def drop_uncommitted(self) -> None:
        """Forget bytes put but never committed: a new mirror places bytes from our tail."""
