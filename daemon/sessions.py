"""Client sessions: who is attached, whether they are alive, who they are.

Each client process connects once to the session socket (a plain unix stream socket beside the
control socket) and sends ``token\\n`` from its ``hello`` reply.  From then on:

* end-of-file on that socket means the process is gone (crash included): its slots are freed at
  once - the fast crash signal;
* it sends one byte per ``heartbeat_interval``; a client silent for ``lease_timeout`` (stopped,
  hung, frozen container) loses its subscriber slots (they become EVICTED) so a reliable
  publisher is no longer held back - the lease; silent for ``session_timeout``, its session is
  closed and removed, so it no longer counts against any limit;
* ``SO_PEERCRED`` gives its pid/uid/gid as the kernel sees them in the daemon's pid namespace,
  which identity checks (containers) build on.

The listener survives its clients: an ``accept()`` that fails for lack of descriptors or memory
is logged and accepting pauses for ``accept_backoff`` (the backlog waits in the kernel) while the
loop goes on serving; connections beyond ``quota_connections`` per tenant are closed at once,
and a connection (or a ``hello``) that does not present a valid token within
``session_connect_timeout`` is closed and forgotten.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from .config import Settings
from .logformat import Throttle

log = logging.getLogger("shimmy.daemon")
_CRED = struct.Struct("3i")
TOKEN_BYTES = 16
TOKEN_LINE_MAX = 2 * TOKEN_BYTES + 1   # hex token and its newline
ACCEPT_BATCH = 32   # connections accepted per loop pass (the others' heartbeats come first)
#: accept() errors that mean "no resources right now", not "this connection is bad"
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS})


@dataclass
class Client:
    id: int
    token: str
    claimed_pid: int
    tenant: str = ""             # quota account (daemon/quotas.py)
    hello_uid: int | None = None  # uid that said hello (control peer credentials), if known
    created: float = field(default_factory=time.monotonic)
    sock: socket.socket | None = None
    pid: int | None = None       # from peer credentials, once the session is connected
    uid: int | None = None
    gid: int | None = None
    last_beat: float = field(default_factory=time.monotonic)
    evicted: bool = False
    container: str | None = None
    policy: object | None = None  # label_policy.LabelPolicy, computed on first channel operation
    said_goodbye: bool = False    # sent b"q" before closing: a clean exit, not a crash
    caller: object | None = None  # access.Caller, computed on first channel operation

    def describe(self) -> dict:
        return {"id": self.id, "pid": self.pid or self.claimed_pid, "uid": self.uid,
                "connected": self.sock is not None, "evicted": self.evicted,
                "container": self.container, "tenant": self.tenant,
                "access": self.policy.describe() if self.policy is not None else None,  # type: ignore[attr-defined]
                "idle_s": round(time.monotonic() - self.last_beat, 3)}


@dataclass
class _Pending:
    sock: socket.socket
    since: float
    tenant: str
    uid: int
    buf: bytes = b""


class Sessions:
    def __init__(self, path: str, settings: Settings, tenant_of: Callable[[int, int], str],
                 prepare_socket: Callable[[str], None], room: Callable[[], int]):
        self.path = path
        self.room = room                # connections the descriptor budget still allows
        self.settings = settings
        self.tenant_of = tenant_of      # (uid, pid) -> quota account
        self.clients: dict[int, Client] = {}
        self._by_token: dict[str, Client] = {}
        self._by_fd: dict[int, Client] = {}
        self._pending: dict[int, _Pending] = {}
        self._next_id = 1
        self._paused_until = 0.0
        self._warn = Throttle(log).warning
        self.counters = Counter({"accept_errors": 0, "connections_refused": 0,
                                 "sessions_timed_out": 0, "hellos_expired": 0,
                                 "connections_timed_out": 0})
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        prepare_socket(path)
        self.listener.listen(512)
        self.listener.setblocking(False)

    # -- clients ------------------------------------------------------------------------------
    def new_client(self, claimed_pid: int, tenant: str, hello_uid: int | None) -> Client:
        client = Client(self._next_id, secrets.token_hex(TOKEN_BYTES), claimed_pid, tenant,
                        hello_uid)
        self._next_id += 1
        self.clients[client.id] = client
        self._by_token[client.token] = client
        return client

    def count(self, tenant: str) -> int:
        return sum(1 for c in self.clients.values() if c.tenant == tenant)

    def connections(self, tenant: str) -> int:
        return (sum(1 for p in self._pending.values() if p.tenant == tenant)
                + sum(1 for c in self._by_fd.values() if c.tenant == tenant))

    def open_fds(self) -> int:
        return len(self._pending) + len(self._by_fd)

    def fds(self, now: float) -> list[int]:
        listening = [self.listener.fileno()] if now >= self._paused_until else []
        return [*listening, *self._pending, *self._by_fd]

    def on_readable(self, fd: int) -> list[Client]:
        """Handle one readable fd; return clients that just went away."""
        if fd == self.listener.fileno():
            self._accept()
            return []
        if fd in self._pending:
            self._read_token(fd)
            return []
        client = self._by_fd.get(fd)
        if client is None or client.sock is None:
            return []
        try:
            data = client.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            data = b""
        if not data:
            return [self._close(client)]
        if b"q" in data:
            client.said_goodbye = True
        client.last_beat = time.monotonic()
        return []

    def settle(self) -> None:
        """Accept and identify session connections already queued.  A client sends its token
        before its first request, so a request that overtakes it in our loop finds it here."""
        if time.monotonic() >= self._paused_until:
            self._accept()
        for fd in list(self._pending):
            self._read_token(fd)

    # -- accepting ----------------------------------------------------------------------------
    def _accept(self) -> None:
        s = self.settings
        for _ in range(ACCEPT_BATCH):   # the rest next pass: a connect flood cannot starve
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self.counters["accept_errors"] += 1
                if exc.errno in RESOURCE_ERRNOS:
                    self._paused_until = time.monotonic() + s.accept_backoff
                    self._warn("accept", "session socket: accept failed (%s, %d connections "
                               "open); pausing accepts for accept_backoff=%.2fs, still serving",
                               errno.errorcode.get(exc.errno or 0, exc), self.open_fds(),
                               s.accept_backoff)
                    return
                continue  # ECONNABORTED, EPROTO...: that connection is gone, take the next
            pid, uid, _gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                          _CRED.size))
            tenant = self.tenant_of(uid, pid)
            if (self.open_fds() >= s.max_clients or self.room() <= 0
                    or self.connections(tenant) >= s.quota_connections):
                self.counters["connections_refused"] += 1
                self._warn("quota:" + tenant, "session socket: refusing a connection from %s "
                           "(pid %d): quota_connections=%d per tenant, max_clients=%d in all, "
                           "and the descriptors left for connections (%d)", tenant, pid,
                           s.quota_connections, s.max_clients, self.room())
                sock.close()
                continue
            sock.setblocking(False)
            self._pending[sock.fileno()] = _Pending(sock, time.monotonic(), tenant, uid)

    def _read_token(self, fd: int) -> None:
        pending = self._pending[fd]
        try:
            data = pending.sock.recv(TOKEN_LINE_MAX - len(pending.buf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        pending.buf += data
        if data and b"\n" not in pending.buf and len(pending.buf) < TOKEN_LINE_MAX:
            return  # the rest of the line is on its way
        del self._pending[fd]
        token = pending.buf.split(b"\n", 1)[0].decode("ascii", "replace")
        client = self._by_token.get(token)
        if client is None or client.sock is not None:
            self._warn("token", "session socket: unknown token, closing connection")
            pending.sock.close()
            return
        pid, uid, gid = _CRED.unpack(pending.sock.getsockopt(socket.SOL_SOCKET,
                                                             socket.SO_PEERCRED, _CRED.size))
        if client.hello_uid is not None and uid != client.hello_uid:
            self._warn("token", "session socket: uid %d presented the token of client %d "
                       "(hello from uid %d); closing", uid, client.id, client.hello_uid)
            pending.sock.close()
            return
        client.sock, client.pid, client.uid, client.gid = pending.sock, pid or None, uid, gid
        client.tenant = pending.tenant
        client.last_beat = time.monotonic()
        self._by_fd[fd] = client
        log.info("client %d connected pid=%s uid=%s", client.id, client.pid, uid)

    # -- endings ------------------------------------------------------------------------------
    def _close(self, client: Client) -> Client:
        if client.sock is not None:
            self._by_fd.pop(client.sock.fileno(), None)
            client.sock.close()
            client.sock = None
        self.clients.pop(client.id, None)
        self._by_token.pop(client.token, None)
        return client

    def disconnect(self, client: Client) -> None:
        self._close(client)

    def expired(self, now: float) -> tuple[list[Client], list[Client], list[Client]]:
        """(clients whose lease just lapsed, clients that never opened their session, clients
        silent for session_timeout); the last two are closed and removed."""
        s = self.settings
        lapsed, ghosts, silent = [], [], []
        for client in list(self.clients.values()):
            if client.sock is None:
                if now - client.created > s.session_connect_timeout:
                    self.counters["hellos_expired"] += 1
                    ghosts.append(self._close(client))
            elif now - client.last_beat > s.session_timeout:
                self.counters["sessions_timed_out"] += 1
                silent.append(self._close(client))
            elif not client.evicted and now - client.last_beat > s.lease_timeout:
                client.evicted = True
                lapsed.append(client)
        for fd, pending in list(self._pending.items()):
            if now - pending.since > s.session_connect_timeout:
                del self._pending[fd]
                pending.sock.close()
                self.counters["connections_timed_out"] += 1
        return lapsed, ghosts, silent

    def close(self) -> None:
        for client in list(self.clients.values()):
            self._close(client)
        for pending in self._pending.values():
            pending.sock.close()
        self._pending.clear()
        self.listener.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
