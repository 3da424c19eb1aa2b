"""Waiting for room: the room semaphore a reliable publisher sleeps on, and the consumers' posts
that end its sleep (spec/ring.md, "Waiting for room").

The publisher (RingWriter._wait_for_space) stores the position it waits for in its ``room_wait``
word, fences, re-checks the subscribers' positions and sleeps on its ring's room semaphore, each
sleep bounded.  A consumer whose stored position reaches that word posts the semaphore once per
value it sees (``RoomPoster``); the daemon posts it where a slot stops counting (``post_room``).
This room only loads ring words: the publisher alone stores ``room_wait``.
"""

from __future__ import annotations

import posix_ipc

from shimmy.ring.layout import W_ROOM_WAIT
from shimmy.ring.views import RingView
from shimmy.ring.wakeups import fence


def open_room(name: str | None) -> posix_ipc.Semaphore | None:
    """The room semaphore ``name`` (from the daemon's reply), or None where there is none: no
    name (a daemon that makes none, a ring mapped without a daemon), or it is gone with its
    channel.  None means the publisher polls and the consumers post nothing: both stay
    correct, the publisher only learns of room later (spec/ring.md, "Waiting for room")."""
    if not name:
        return None
    try:
        return posix_ipc.Semaphore(name)
    except (posix_ipc.Error, OSError):
        return None


class RoomPoster:
    """A consumer's side of the wait for room, for consumers outside a RingReader (the daemon's
    mirror source): after storing its position, ``reached(pos)`` posts the ring's room
    semaphore if the publisher waits for a position at most ``pos`` that this consumer has not
    posted for yet.  ``fenced``: fence between the position store and the load of
    ``room_wait`` (a full Dekker arm: the post is never late), for a consumer that stores its
    position rarely (once per credit)."""

    def __init__(self, view: RingView, name: str | None, fenced: bool = False):
        self._q = view.q
        self._name = name
        self._sem: posix_ipc.Semaphore | None = None
        self._fenced = fenced
        self.posted = 0   # the room_wait value posted last

    def reached(self, pos: int) -> None:
        if self._fenced:
            fence()   # SYNC POINT (room wait, consumer side), spec/ring.md "Waiting for room"
        need = self._q[W_ROOM_WAIT]
        if need and need <= pos and need != self.posted:
            self.posted = need
            self.post()

    def post(self) -> None:
        if self._sem is None:
            self._sem = open_room(self._name)
            if self._sem is None:
                self._name = None   # none to post: the publisher's bounded sleep covers it
                return
        try:
            self._sem.release()
        except (posix_ipc.Error, OSError, ValueError):
            pass   # at SEM_VALUE_MAX: the publisher has posts enough to wake

    def close(self) -> None:
        if self._sem is not None:
            try:
                self._sem.close()
            except posix_ipc.Error:
                pass
            self._sem = None


def post_room(view: RingView, name: str | None) -> None:
    """The daemon, after a slot of the ring left ACTIVE (freed or evicted): the publisher no
    longer waits for it, so post the room semaphore if the publisher waits at all (its
    re-check decides whether there is room now)."""
    fence()   # SYNC POINT (room wait, consumer side): the slot's state store, then room_wait
    if view.q[W_ROOM_WAIT]:
        poster = RoomPoster(view, name)
        poster.post()
        poster.close()
