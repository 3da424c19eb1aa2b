"""Client sessions: who is attached, whether they are alive, who they are.

Each client process connects once to the session socket (a plain unix stream socket beside the
control socket) and sends ``token\\n`` from its ``hello`` reply.  From then on:

* end-of-file on that socket means the process is gone (crash included): its slots are freed at
  once - the fast crash signal;
* it sends one byte per ``heartbeat_interval``; a client silent for ``lease_timeout`` (stopped,
  hung, frozen container) loses its subscriber slots (they become EVICTED) so a reliable
  publisher is no longer held back - the lease;
* ``SO_PEERCRED`` gives its pid/uid/gid as the kernel sees them in the daemon's pid namespace,
  which identity checks (containers) build on.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import struct
import time
from dataclasses import dataclass, field

log = logging.getLogger("shimmy.daemon")
_CRED = struct.Struct("3i")


@dataclass
class Client:
    id: int
    token: str
    claimed_pid: int
    created: float = field(default_factory=time.monotonic)
    sock: socket.socket | None = None
    pid: int | None = None       # from peer credentials, once the session is connected
    uid: int | None = None
    gid: int | None = None
    last_beat: float = field(default_factory=time.monotonic)
    evicted: bool = False
    container: str | None = None
    policy: object | None = None  # identity.AccessPolicy, computed on first channel operation
    said_goodbye: bool = False    # sent b"q" before closing: a clean exit, not a crash

    def describe(self) -> dict:
        return {"id": self.id, "pid": self.pid or self.claimed_pid, "uid": self.uid,
                "connected": self.sock is not None, "evicted": self.evicted,
                "container": self.container,
                "access": self.policy.describe() if self.policy is not None else None,
                "idle_s": round(time.monotonic() - self.last_beat, 3)}


class Sessions:
    def __init__(self, path: str, lease_timeout: float, max_clients: int):
        self.path = path
        self.lease_timeout = lease_timeout
        self.max_clients = max_clients
        self.clients: dict[int, Client] = {}
        self._by_fd: dict[int, Client] = {}
        self._pending: dict[int, tuple[socket.socket, float]] = {}
        self._next_id = 1
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        os.chmod(path, 0o666)
        self.listener.listen(128)
        self.listener.setblocking(False)

    def new_client(self, claimed_pid: int) -> Client:
        client = Client(self._next_id, secrets.token_hex(16), claimed_pid)
        self._next_id += 1
        self.clients[client.id] = client
        return client

    def fds(self) -> list[int]:
        return [self.listener.fileno(), *self._pending, *self._by_fd]

    def on_readable(self, fd: int) -> list[Client]:
        """Handle one readable fd; return clients that just went away."""
        if fd == self.listener.fileno():
            self._accept()
            return []
        if fd in self._pending:
            self._read_token(fd)
            return []
        client = self._by_fd.get(fd)
        if client is None:
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
        self._accept()
        for fd in list(self._pending):
            self._read_token(fd)

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            self._pending[sock.fileno()] = (sock, time.monotonic())

    def _read_token(self, fd: int) -> None:
        sock, _ = self._pending.pop(fd)
        try:
            data = sock.recv(64)
        except BlockingIOError:
            self._pending[fd] = (sock, time.monotonic())
            return
        except OSError:
            data = b""
        token = data.split(b"\n", 1)[0].decode("ascii", "replace")
        client = next((c for c in self.clients.values() if c.token == token and c.sock is None),
                      None)
        if client is None:
            log.warning("session socket: unknown token, closing connection")
            sock.close()
            return
        pid, uid, gid = _CRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                     _CRED.size))
        client.sock, client.pid, client.uid, client.gid = sock, pid or None, uid, gid
        client.last_beat = time.monotonic()
        self._by_fd[fd] = client
        log.info("client %d connected pid=%s uid=%s", client.id, client.pid, uid)

    def _close(self, client: Client) -> Client:
        if client.sock is not None:
            self._by_fd.pop(client.sock.fileno(), None)
            client.sock.close()
            client.sock = None
        self.clients.pop(client.id, None)
        return client

    def disconnect(self, client: Client) -> None:
        self._close(client)

    def expired(self, now: float, hello_grace: float = 10.0) -> tuple[list[Client], list[Client]]:
        """(clients whose lease just lapsed, clients that never opened their session)."""
        lapsed, ghosts = [], []
        for client in list(self.clients.values()):
            if client.sock is None:
                if now - client.created > hello_grace:
                    ghosts.append(self._close(client))
            elif not client.evicted and now - client.last_beat > self.lease_timeout:
                client.evicted = True
                lapsed.append(client)
        for fd, (sock, since) in list(self._pending.items()):
            if now - since > hello_grace:
                del self._pending[fd]
                sock.close()
        return lapsed, ghosts

    def close(self) -> None:
        for client in list(self.clients.values()):
            self._close(client)
        for sock, _ in self._pending.values():
            sock.close()
        self._pending.clear()
        self.listener.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
