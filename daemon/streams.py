"""The daemon's book of byte streams: who holds each end, and reclaiming a stream's memory.

A stream is created by whichever end opens it first and lives until both ends are done:

* an end is ``open`` (held by a live client), ``closed`` (its holder closed it cleanly) or
  ``dead`` (its holder's session socket hit EOF while the end was open: a crash);
* a dead end's *broken* flag is set in the segment and the survivor's semaphore posted, so a
  reader drains what was committed and then gets StreamBroken, and a writer's next write fails;
* the stream is freed (segment and semaphores unlinked) when the reader has finished and the
  writer is not open, or when the writer died before any reader came and had written nothing.
  A writer that finished (closed, or died after writing) before a reader came leaves the stream
  and its bytes for that reader for ``stream_orphan_timeout`` seconds (0: until the daemon
  stops); after that the stream is an orphan and is freed (``reap``);
* ``shimmy rm`` (``delete``) frees a stream at once, for its owner or root; ends still attached
  see the retired word and get StreamBroken;
* while any end of a stream is finished but the stream is not yet freed, opening that end again
  is refused with StreamBusy; after the stream is freed the name is free for a new stream.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass, field

import posix_ipc

from shimmy import stream_ring
from shimmy.errors import (ChannelConflict, ChannelNotFound, InvalidArgument, LimitExceeded,
                           StreamBusy)
from shimmy.names import object_token, validate_name

from . import dispatch
from .access import Ownership

log = logging.getLogger("shimmy.daemon")
ROLES = ("writer", "reader")
FINISHED_KEPT = 64  # freed streams remembered for `list` (so a late reader is told, not hung)


@dataclass
class End:
    client: int
    pid: int
    state: str = "open"  # open | closed | dead


@dataclass
class StreamRecord:
    name: str
    token: str
    serial: int
    capacity: int
    shm_name: str
    mm: object
    view: stream_ring.StreamView
    sems: dict  # role -> the posix_ipc.Semaphore that role sleeps on
    created: float = field(default_factory=time.time)
    writer: End | None = None
    reader: End | None = None
    owner: Ownership | None = None   # who created it (daemon/access.py); quotas count it
    # time.monotonic() when the writer finished while no reader had opened the stream; the
    # orphan clock of stream_orphan_timeout (a reader that opens it stops the clock for good)
    orphan_since: float | None = None

    def end(self, role: str) -> End | None:
        return self.writer if role == "writer" else self.reader

    def describe(self) -> dict:
        q = self.view.q
        tail, head = q[stream_ring.OFF_TAIL // 8], q[stream_ring.OFF_HEAD // 8]

        def end(e: End | None):
            return None if e is None else {"client": e.client, "pid": e.pid, "state": e.state}

        return {"name": self.name, "kind": "stream", "capacity": self.capacity,
                "shm": self.shm_name, "serial": self.serial, "written": tail, "read": head,
                "buffered": tail - head, "eof": bool(q[stream_ring.OFF_EOF // 8]),
                "writer": end(self.writer), "reader": end(self.reader),
                "orphaned_for": self.orphaned_for(time.monotonic())}

    def orphaned_for(self, now: float) -> float | None:
        """Seconds since the writer finished with no reader (None: not an orphan)."""
        if self.orphan_since is None or self.reader is not None:
            return None
        return now - self.orphan_since


class StreamService:
    """Stream operations for the daemon (``ops()``) plus its client-death and shutdown hooks."""

    def __init__(self, daemon):
        self.daemon = daemon
        self.settings = daemon.settings
        self.segments = daemon.segments
        self.callers = daemon.callers
        self.streams: dict[str, StreamRecord] = {}
        self._serial = itertools.count(1)
        self.counters = {"streams_created": 0, "streams_freed": 0, "stream_ends_broken": 0,
                         "streams_orphaned": 0, "streams_deleted": 0}
        # name -> what the last freed stream of that name carried; bounded, oldest dropped first
        self.finished: dict[str, dict] = {}

    def ops(self) -> dict:
        return {"stream_open": self.op_open, "stream_close": self.op_close,
                "stream_list": self.op_list}

    # -- operations -------------------------------------------------------------------------------
    def op_open(self, req: dict) -> dict:
        client = self.callers.client(req)
        name = validate_name(req.get("name"))
        role = req.get("role")
        if role not in ROLES:
            raise InvalidArgument(f"stream role must be 'writer' or 'reader', got {role!r}")
        capacity = dispatch.field(req, "capacity", int, optional=True, lo=1,
                                  hi=self.settings.max_capacity)
        op = "publish" if role == "writer" else "subscribe"   # the label each end needs
        rec = self.streams.get(name)
        if rec is None:
            self.callers.policy(client).check(op, name)
            who = client.tenant
            ownership = self.daemon.access.ownership_for(self.callers.caller(client), name, who,
                                                         "stream")
            cap = stream_ring.DEFAULT_CAPACITY if capacity is None else capacity
            try:
                size = stream_ring.segment_size(cap)
            except (ValueError, OverflowError):
                size = 0   # an invalid capacity: _create names the rule
            self.callers.check_create_quota(who, size)
            rec = self._create(name, capacity, dataclasses.replace(ownership, size=size))
        else:
            self.callers.authorize(client, op, name, rec.owner, "stream")
        if capacity is not None and capacity != rec.capacity:
            raise ChannelConflict(f"stream {name!r} exists with capacity={rec.capacity}, asked "
                                  f"for capacity={capacity}")
        held = rec.end(role)
        if held is not None:
            if held.state == "open":
                raise StreamBusy(f"stream {name!r} already has a {role}: pid {held.pid}; one "
                                 f"{role} at a time")
            other = rec.end("reader" if role == "writer" else "writer")
            raise StreamBusy(
                f"stream {name!r}: its {role} (pid {held.pid}) has finished ({held.state}) but "
                f"the stream is still in use by its "
                f"{'reader' if role == 'writer' else 'writer'} "
                f"(pid {other.pid if other else '-'}); "
                f"the name is free again once both ends have closed")
        pid = client.pid or client.claimed_pid
        end = End(client.id, pid)
        stream_ring.daemon_set_pid(rec.view, role, pid)
        if role == "writer":
            rec.writer = end
        else:
            rec.reader = end
        prefix = self.segments.sem_prefix(rec.token)
        return {"shm": rec.shm_name, "sem_reader": prefix + "r", "sem_writer": prefix + "w",
                "capacity": rec.capacity, "serial": rec.serial}

    def op_close(self, req: dict) -> dict:
        client = self.callers.client(req)
        name = validate_name(req.get("name"))
        role = req.get("role")
        serial = dispatch.field(req, "serial", int, lo=0, hi=(1 << 63) - 1)
        rec = self.streams.get(name)
        if rec is None or rec.serial != serial:
            return {}  # already freed (the daemon saw the other end go first)
        end = rec.end(role) if role in ROLES else None
        if end is None or end.client != client.id:
            raise InvalidArgument(f"stream {name!r}: the {role} end is not yours")
        if end.state == "open":
            end.state = "closed"
        self._maybe_free(rec)
        return {}

    def op_list(self, req: dict) -> dict:
        return {"streams": self.describe()}

    def delete(self, client, name: str) -> None:
        """``delete`` of a stream (daemon op_delete): its owner or root frees it now; an end
        still attached sees the retired word and gets StreamBroken on its next operation that
        needs the other end (a reader first gets what is already buffered)."""
        rec = self.streams.get(name)
        if rec is None:
            raise ChannelNotFound(f"stream {name!r} does not exist")
        self.daemon.access.check(self.callers.caller(client), "delete", name, rec.owner,
                                 "stream")
        self.counters["streams_deleted"] += 1
        log.info("stream %s: deleted by client %d pid=%s (owner %s, %d bytes dropped)", name,
                 client.id, client.pid or client.claimed_pid, _owner(rec), _buffered(rec))
        self._free(rec, "deleted")

    def reap(self, now: float) -> None:
        """Free orphans: streams whose writer finished with no reader for stream_orphan_timeout
        seconds (housekeeping; ``now`` is time.monotonic())."""
        timeout = self.settings.stream_orphan_timeout
        if not timeout:
            return
        for rec in list(self.streams.values()):
            waited = rec.orphaned_for(now)
            if waited is None or waited < timeout:
                continue
            self.counters["streams_orphaned"] += 1
            log.info("stream %s: writer finished %.0f s ago and no reader came "
                     "(stream_orphan_timeout=%g s): freeing it (owner %s, %d bytes dropped)",
                     rec.name, waited, timeout, _owner(rec), _buffered(rec))
            self._free(rec, "orphaned")

    # -- hooks ------------------------------------------------------------------------------------
    def drop_client(self, client_id: int) -> int:
        """The client is gone: break every end it held open, wake the peers, free what is done."""
        n = 0
        for rec in list(self.streams.values()):
            for role in ROLES:
                end = rec.end(role)
                if end is None or end.client != client_id or end.state != "open":
                    continue
                end.state = "dead"
                n += 1
                self.counters["stream_ends_broken"] += 1
                stream_ring.daemon_mark_broken(rec.view, role)
                # Wake the survivor: the reader sleeps on "reader", the writer on "writer".
                peer = "reader" if role == "writer" else "writer"
                try:
                    rec.sems[peer].release()
                except posix_ipc.Error:
                    pass
                log.info("stream %s: %s pid=%s died without closing; marked broken",
                         rec.name, role, end.pid)
            self._maybe_free(rec)
        return n

    def close_all(self) -> None:
        for rec in list(self.streams.values()):
            self._free(rec)

    def describe(self, visible=None) -> list[dict]:
        """Every stream (``visible`` None), none (False), or those the caller may see."""
        if visible is False:
            return []
        timeout = self.settings.stream_orphan_timeout
        out = []
        for rec in self.streams.values():
            if visible is None or self.daemon.access.allows(visible, "stat", rec.name, rec.owner):
                d = rec.describe()
                waited = d["orphaned_for"]
                # seconds until the orphan is freed; None: not an orphan, or kept (timeout 0)
                d["freed_in"] = (None if waited is None or not timeout
                                 else max(timeout - waited, 0.0))
                out.append(d)
        return out

    def finished_for(self, visible=None) -> list[dict]:
        """Streams freed after being read to their end, deleted, or freed unread as orphans (so
        a late reader is told, not left waiting), filtered as :meth:`describe` filters."""
        if visible is False:
            return []
        return [{k: v for k, v in done.items() if k != "owner"}
                for done in self.finished.values()
                if visible is None or self.daemon.access.allows(visible, "stat", done["name"],
                                                                done["owner"])]

    def owned_by(self, who: str) -> list[int]:
        """The sizes of the streams tenant ``who`` created that are alive."""
        return [rec.owner.size for rec in self.streams.values()
                if rec.owner is not None and rec.owner.principal == who]

    # -- internals --------------------------------------------------------------------------------
    def _create(self, name: str, capacity: int | None, owner: Ownership) -> StreamRecord:
        s = self.settings
        capacity = stream_ring.DEFAULT_CAPACITY if capacity is None else capacity
        stream_ring.check_capacity(capacity)
        if capacity > s.max_capacity:
            raise InvalidArgument(f"stream capacity {capacity} exceeds max_capacity "
                                  f"{s.max_capacity}")
        if len(self.streams) >= s.max_channels:
            raise LimitExceeded(f"cannot create stream {name!r}: max_channels ({s.max_channels}) "
                                f"streams exist (streams count against the same limit separately)")
        serial = next(self._serial)
        # "stream:" cannot appear in a channel name, so stream and channel tokens never collide;
        # the serial keeps a reused name from meeting the previous stream's objects.
        token = f"{object_token('stream:' + name)}-{serial}"
        self.segments.claim(token, owner)
        try:
            shm_name, mm = self.segments.create_stream(token, name, capacity)
        except BaseException:
            self.segments.unclaim(token)
            raise
        prefix = self.segments.sem_prefix(token)
        sems = {}
        try:
            for role, suffix in (("reader", "r"), ("writer", "w")):
                sems[role] = self.segments.open_semaphore(token, suffix)
        except BaseException:
            for sem in sems.values():
                sem.close()
            self.segments.destroy(token, mm, 0)
            for suffix in "rw":
                _unlink_sem(prefix + suffix)
            raise
        rec = StreamRecord(name=name, token=token, serial=serial, capacity=capacity,
                           shm_name=shm_name, mm=mm, view=stream_ring.StreamView(mm), sems=sems,
                           owner=owner)
        self.streams[name] = rec
        self.finished.pop(name, None)
        self.counters["streams_created"] += 1
        log.info("created stream %s capacity=%d shm=%s", name, capacity, shm_name)
        return rec

    def _maybe_free(self, rec: StreamRecord) -> None:
        w, r = rec.writer, rec.reader
        writer_open = w is not None and w.state == "open"
        reader_done = r is not None and r.state != "open"
        # A dead writer with no reader yet keeps the stream (the committed bytes, then
        # StreamBroken, are for the reader that comes) unless it never committed anything.
        writer_died_alone = (w is not None and w.state == "dead" and r is None
                             and rec.view.q[stream_ring.OFF_TAIL // 8] == 0)
        if (reader_done and not writer_open) or writer_died_alone:
            self._free(rec)
        elif w is not None and not writer_open and r is None and rec.orphan_since is None:
            rec.orphan_since = time.monotonic()   # kept for a reader: the orphan clock starts

    def _free(self, rec: StreamRecord, how: str | None = None) -> None:
        """Free the stream; ``how`` ("deleted", "orphaned") is remembered for late readers, as
        is a stream read to its end ("read")."""
        self.streams.pop(rec.name, None)
        q = rec.view.q
        written = q[stream_ring.OFF_TAIL // 8]
        dropped = written - q[stream_ring.OFF_HEAD // 8]
        if how is None and bool(q[stream_ring.OFF_EOF // 8]) and dropped == 0 and \
                rec.reader is not None and rec.reader.state == "closed":
            how = "read"
        rec.view.release()
        self.segments.destroy(rec.token, rec.mm, 0)
        prefix = self.segments.sem_prefix(rec.token)
        for role, suffix in (("reader", "r"), ("writer", "w")):
            sem = rec.sems[role]
            try:
                sem.release()  # anyone still asleep wakes, sees retired, and stops
                sem.close()
            except posix_ipc.Error:
                pass
            _unlink_sem(prefix + suffix)
        self.counters["streams_freed"] += 1
        if how is not None:
            self.finished.pop(rec.name, None)
            self.finished[rec.name] = {"name": rec.name, "written": written, "dropped": dropped,
                                       "how": how, "freed": time.time(), "owner": rec.owner}
            while len(self.finished) > FINISHED_KEPT:
                del self.finished[next(iter(self.finished))]
        log.info("freed stream %s (%d bytes written, serial %d)", rec.name, written, rec.serial)


def _owner(rec: StreamRecord) -> str:
    own = rec.owner
    if own is None:
        return "the daemon"
    uid = f"uid:{own.uid}"
    return uid if own.principal in ("", uid) else f"{own.principal} {uid}"


def _buffered(rec: StreamRecord) -> int:
    q = rec.view.q
    return q[stream_ring.OFF_TAIL // 8] - q[stream_ring.OFF_HEAD // 8]


def _unlink_sem(name: str) -> None:
    try:
        posix_ipc.unlink_semaphore(name)
    except posix_ipc.ExistentialError:
        pass
