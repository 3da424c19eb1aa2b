"""The transport interface every mirror runs over.

A transport moves bytes of one source ring into the replica ring of one mirror on another node.
It knows nothing about frames, modes or loss: the mirror halves in ``mirror.py`` decide what to
send and when, so ordering, flow control, loss accounting and resume are the same whatever moves
the bytes (TCP here, RDMA in ``rdma.py``).

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
  and ``position`` (a gap): the replica moves head and tail there.
* ``credits()``: the latest consumed position the replica reported (min of its live
  subscribers' positions, or its tail when it has none), or None before the first report.
* ``close()``: stop; later calls raise ``TransportClosed``.  Idempotent.

A transport may block in ``put``/``commit`` (bounded by the link timeout) and raises
``TransportClosed`` when its link is gone; the mirror then waits for a reconnect and resumes from
the replica's last committed position.
"""

from __future__ import annotations

import abc
from typing import Sequence


class TransportClosed(ConnectionError):
    """The link under a transport is gone (or the transport was closed)."""


class Transport(abc.ABC):
    """Source end of one mirror's transport."""

    kind = "abstract"
    fallback: str | None = None      # why this mirror is not on RDMA (set by rdma_mirrors.py)

    def describe(self) -> dict:
        """Transport-specific fields for ``ls`` / ``stat`` (registration, fallback reason...)."""
        return {"fallback": self.fallback} if self.fallback else {}

    @abc.abstractmethod
    def put(self, start: int, views: Sequence[memoryview], guard: int) -> None: ...

    @abc.abstractmethod
    def commit(self, tail: int, last: int, pad_until: int = 0) -> None: ...

    @abc.abstractmethod
    def jump(self, position: int, last: int) -> None: ...

    @abc.abstractmethod
    def credits(self) -> int | None: ...

    @abc.abstractmethod
    def close(self) -> None: ...


class ReplicaSink(abc.ABC):
    """Replica end: what a transport's receiving side calls, in stream order."""

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
