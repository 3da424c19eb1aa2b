"""The control socket: the daemon's own unix stream listener for control protocol v2.

Frames and their rules are stated once, in ``spec/control.md`` ("Transport"); the helpers are in
:mod:`shimmy.protocol`.  This module owns the listening socket and its connections; the daemon's
loop polls the descriptors it names (:meth:`ControlListener.poll_events`) and hands each payload
to the daemon's request handler, which answers with one reply map.

The listener survives its clients, like the session socket (daemon/sessions.py):

* ``accept()`` failing for lack of descriptors or memory is counted and logged (once a second at
  most), and accepting pauses for ``accept_backoff`` while the loop goes on serving;
* connections beyond ``quota_control_connections`` per tenant, or beyond the descriptors the
  daemon keeps for connections (its nofile limit less headroom, shared with the session socket),
  get one error reply naming the limit and are closed; each refusal is counted;
* a connection that has sent nothing within ``control_request_timeout`` of connecting, or that
  leaves a request unfinished that long (slow or half-open clients), is closed and counted;
* a frame over ``request_max_bytes``, an empty frame, or bytes that are not one msgpack map get
  an error reply (code ``protocol``) and the connection is closed once that reply is out;
* a client that does not read its replies stops being read (at ``OUT_MAX`` bytes of replies
  waiting): its memory in the daemon is bounded, and the other clients go on being served.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import msgpack

from shimmy.errors import LimitExceeded, ProtocolError, ShimmyError
from shimmy.protocol import FRAME_HEADER, PROTOCOL_VERSION, frame

from .config import Settings
from .identity import peer_credentials
from .logformat import Throttle
from .sessions import ACCEPT_BATCH, RESOURCE_ERRNOS

log = logging.getLogger("shimmy.daemon")
READ_CHUNK = 1 << 16   # bytes read from one connection per readable event
BATCH = 64             # requests answered from one connection per loop pass (fairness)
OUT_MAX = 1 << 18      # reply bytes waiting for a client before its requests stop being read
BACKLOG = 512
#: The greeting a ZeroMQ peer (a client of control protocol v1) sends first: 0xFF, 8 bytes,
#: 0x7F (ZMTP 3 signature).
ZMTP_SIGNATURE_LEN = 10

POLL_IN = select.POLLIN
POLL_OUT = select.POLLOUT


@dataclass
class Conn:
    sock: socket.socket
    pid: int
    uid: int
    tenant: str
    since: float                       # when its unfinished request (or the connection) began
    spoke: bool = False                # a whole request has arrived
    closing: bool = False              # close once the replies waiting are out
    rbuf: bytearray = field(default_factory=bytearray)
    wbuf: bytearray = field(default_factory=bytearray)


# The handler's answer to one payload: (reply map, whether to close the connection after it).
Handler = Callable[[bytes, Conn], "tuple[dict, bool]"]


class ControlListener:
    def __init__(self, path: str, settings: Settings, tenant_of: Callable[[int, int], str],
                 prepare_socket: Callable[[str], None], room: Callable[[], int],
                 handle: Handler):
        self.path = path
        self.settings = settings
        self.tenant_of = tenant_of   # (uid, pid) -> quota account
        self.room = room             # connections the descriptor budget still allows
        self.handle = handle
        self.conns: dict[int, Conn] = {}
        self.ready: set[int] = set()   # connections holding whole requests not yet answered
        self._paused_until = 0.0
        self._warn = Throttle(log).warning   # a flood must not flood the log
        self.counters = Counter({"control_accept_errors": 0, "control_connections_refused": 0,
                                 "control_connections_timed_out": 0,
                                 "control_frames_refused": 0})
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        prepare_socket(path)
        self.listener.listen(BACKLOG)
        self.listener.setblocking(False)

    # -- the loop's view ---------------------------------------------------------------------
    def poll_events(self, now: float) -> dict[int, int]:
        """Descriptor -> poll events this listener waits for."""
        events = {} if now < self._paused_until else {self.listener.fileno(): POLL_IN}
        for fd, conn in self.conns.items():
            ev = POLL_OUT if conn.wbuf else 0
            if not conn.closing and len(conn.wbuf) < OUT_MAX:
                ev |= POLL_IN
            events[fd] = ev or select.POLLHUP
        return events

    def open_fds(self) -> int:
        return len(self.conns)

    def connections(self, tenant: str) -> int:
        return sum(1 for c in self.conns.values() if c.tenant == tenant)

    def on_event(self, fd: int, events: int) -> None:
        if fd == self.listener.fileno():
            self._accept()
            return
        conn = self.conns.get(fd)
        if conn is None:
            return
        if events & POLL_OUT:
            self._flush(fd, conn)
        if fd in self.conns and events & (POLL_IN | select.POLLHUP | select.POLLERR):
            if not conn.closing and len(conn.wbuf) < OUT_MAX:
                self._read(fd, conn)
            elif not events & POLL_OUT and events & (select.POLLHUP | select.POLLERR):
                self._drop(fd)

    def serve_ready(self) -> None:
        """Answer requests already buffered (a connection that sent more than one batch)."""
        for fd in list(self.ready):
            conn = self.conns.get(fd)
            self.ready.discard(fd)
            if conn is not None:
                self._serve(fd, conn)

    def expire(self, now: float) -> None:
        """Close connections that sent nothing, or left a request (or an error reply being
        flushed) unfinished, for control_request_timeout."""
        limit = self.settings.control_request_timeout
        for fd, conn in list(self.conns.items()):
            stalled = conn.closing or conn.rbuf or not conn.spoke
            if stalled and now - conn.since > limit:
                self.counters["control_connections_timed_out"] += 1
                self._warn("timeout", "control socket: closing a connection of %s (pid %d) that "
                           "%s for control_request_timeout=%.1fs", conn.tenant, conn.pid,
                           "left a request unfinished" if conn.spoke or conn.rbuf else
                           "sent nothing", limit)
                self._drop(fd)

    def close(self) -> None:
        for fd in list(self.conns):
            self._drop(fd)
        self.listener.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    # -- accepting ---------------------------------------------------------------------------
    def _accept(self) -> None:
        s = self.settings
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.counters["control_accept_errors"] += 1
                if exc.errno in RESOURCE_ERRNOS:
                    self._paused_until = time.monotonic() + s.accept_backoff
                    self._warn("accept", "control socket: accept failed (%s, %d connections "
                               "open); pausing accepts for accept_backoff=%.2fs, still serving",
                               errno.errorcode.get(exc.errno or 0, exc), len(self.conns),
                               s.accept_backoff)
                    return
                continue   # ECONNABORTED, EPROTO...: that connection is gone, take the next
            pid, uid, _gid = peer_credentials(sock)
            tenant = self.tenant_of(uid, pid)
            refusal = None
            if self.room() <= 0:
                refusal = (f"the daemon holds {len(self.conns)} control connections and all the "
                           f"descriptors it keeps for connections (its nofile limit less "
                           f"headroom: nofile_limit); try again later")
            elif self.connections(tenant) >= s.quota_control_connections:
                refusal = (f"{tenant} holds {self.connections(tenant)} control connections; "
                           f"quota_control_connections={s.quota_control_connections} (per "
                           f"container, or per uid outside containers)")
            if refusal is not None:
                self.counters["control_connections_refused"] += 1
                self._warn("refuse:" + tenant, "control socket: refusing a connection from %s "
                           "(pid %d): %s", tenant, pid, refusal)
                _refuse(sock, refusal)
                continue
            sock.setblocking(False)
            self.conns[sock.fileno()] = Conn(sock, pid, uid, tenant, time.monotonic())

    # -- reading and answering ---------------------------------------------------------------
    def _read(self, fd: int, conn: Conn) -> None:
        try:
            data = conn.sock.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(fd)
            return
        if not conn.rbuf:
            conn.since = time.monotonic()   # a request begins: it has control_request_timeout
        conn.rbuf += data
        if not conn.spoke and conn.rbuf[:1] == b"\xff" and len(conn.rbuf) >= ZMTP_SIGNATURE_LEN \
                and conn.rbuf[ZMTP_SIGNATURE_LEN - 1] == 0x7F:
            self._refuse_frame(fd, conn, ProtocolError(
                f"client speaks control protocol v1 (ZeroMQ); this daemon speaks "
                f"v{PROTOCOL_VERSION}: upgrade the client"))
            return
        self._serve(fd, conn)

    def _serve(self, fd: int, conn: Conn) -> None:
        """Answer up to BATCH whole requests in the connection's buffer."""
        limit = self.settings.request_max_bytes
        for _ in range(BATCH):
            if conn.closing or len(conn.wbuf) >= OUT_MAX or len(conn.rbuf) < FRAME_HEADER.size:
                break
            (size,) = FRAME_HEADER.unpack_from(conn.rbuf)
            if not 1 <= size <= limit:
                self._refuse_frame(fd, conn, ProtocolError(
                    f"request frame of {size} bytes; a frame holds 1..request_max_bytes="
                    f"{limit} bytes (one msgpack map)"))
                return
            end = FRAME_HEADER.size + size
            if len(conn.rbuf) < end:
                break
            payload = bytes(conn.rbuf[FRAME_HEADER.size:end])
            del conn.rbuf[:end]
            conn.spoke = True
            conn.since = time.monotonic()
            reply, close = self.handle(payload, conn)
            self._queue(fd, conn, reply)
            if close:
                self.counters["control_frames_refused"] += 1
                conn.closing = True
                conn.rbuf.clear()
        else:
            self.ready.add(fd)   # more may be waiting: the next pass, after the others
        if fd in self.conns and conn.wbuf:
            self._flush(fd, conn)

    def _refuse_frame(self, fd: int, conn: Conn, exc: ShimmyError) -> None:
        self.counters["control_frames_refused"] += 1
        self._warn("frame", "control socket: closing a connection of %s (pid %d): %s",
                   conn.tenant, conn.pid, exc)
        self._queue(fd, conn, {"v": PROTOCOL_VERSION, "id": None, "ok": False,
                               "error": {"code": exc.code, "message": str(exc)}})
        conn.closing = True
        conn.since = time.monotonic()
        conn.rbuf.clear()
        self._flush(fd, conn)

    def _queue(self, fd: int, conn: Conn, reply: dict) -> None:
        conn.wbuf += frame(msgpack.packb(reply))

    def _flush(self, fd: int, conn: Conn) -> None:
        try:
            sent = conn.sock.send(conn.wbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(fd)
            return
        del conn.wbuf[:sent]
        if conn.wbuf:
            return
        if conn.closing:
            self._drop(fd)
        elif len(conn.rbuf) >= FRAME_HEADER.size:
            self.ready.add(fd)   # requests held back while replies waited

    def _drop(self, fd: int) -> None:
        conn = self.conns.pop(fd, None)
        self.ready.discard(fd)
        if conn is not None:
            conn.sock.close()


def _refuse(sock: socket.socket, message: str) -> None:
    """Tell a connection we will not serve why (one error reply, best effort), and close it."""
    err = LimitExceeded(message)
    try:
        sock.setblocking(False)
        sock.send(frame(msgpack.packb({"v": PROTOCOL_VERSION, "id": None, "ok": False,
                                       "error": {"code": err.code, "message": message}})))
    except OSError:
        pass
    sock.close()
