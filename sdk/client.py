"""The SDK's connection to the node daemon (control plane only; no message bytes go this way).

One :class:`DaemonClient` per (process, daemon socket).  It owns a control connection (framed
requests, control protocol v2: shimmy/protocol.py) and a session socket whose lifetime is the
daemon's view of this process's lifetime.  A heartbeat thread keeps the lease.  After ``fork()``
the child drops the parent's client (closing its copies of both sockets, so the parent's death is
still seen) and any object opened before the fork refuses to work in the child: a child must
open its own channels.  The client must never carry message bytes, and never answer for another
process's session.
"""

from __future__ import annotations

import atexit
import errno
import itertools
import os
import select
import socket
import stat
import threading
import time
import weakref

import msgpack
import posix_ipc

from shimmy.errors import (ChannelRetired, DaemonUnavailable, LimitExceeded, PermissionDenied,
                           ProtocolError, error_from_reply)
from shimmy.protocol import (PROTOCOL_VERSION, frame, read_frame, resolve_socket,
                             session_path)

REQUEST_TIMEOUT = 5.0  # seconds to wait for a daemon reply before DaemonUnavailable
GOODBYE = b"q"         # sent on the session socket by close(): the daemon counts a clean exit

_clients: dict[str, "DaemonClient"] = {}
_clients_lock = threading.Lock()
_generation = 0  # bumped in a forked child; objects remember the generation they were made in


def fork_generation() -> int:
    return _generation


def _after_fork_in_child() -> None:
    global _generation, _clients_lock
    _generation += 1
    _clients_lock = threading.Lock()
    for client in _clients.values():
        client._abandon()
    _clients.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _close_all_at_exit() -> None:
    for client in list(_clients.values()):
        client.close()


atexit.register(_close_all_at_exit)


def get_client(daemon: str | None) -> "DaemonClient":
    path = resolve_socket(daemon)
    with _clients_lock:
        client = _clients.get(path)
        if client is None or client.closed:
            client = DaemonClient(path)
            _clients[path] = client
        return client


class DaemonClient:
    def __init__(self, path: str):
        self.path = path
        self.closed = False
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        try:
            os.stat(path)
        except PermissionError:   # a socket directory kept from this uid (mode 0750 + group)
            raise _denied(os.path.dirname(path) or ".", "the daemon's socket directory") \
                from None
        except OSError:
            raise DaemonUnavailable(self._unavailable("no socket file there")) from None
        if not os.access(path, os.R_OK | os.W_OK):
            raise _denied(path, "the daemon's control socket")
        self._sock: socket.socket | None = None   # connected by the first request
        hello = self.request("hello", pid=os.getpid())
        self.id = hello["client"]
        self._token = hello["token"]   # proves our requests are ours (see spec/control.md)
        self.heartbeat_interval = hello["heartbeat_interval"]
        self.lease_timeout = hello["lease_timeout"]
        self._session = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self._session.connect(hello["session"])
            self._session.sendall(hello["token"].encode() + b"\n")
        except OSError as exc:
            self._session.close()
            if hello["session"] != session_path(self.path):
                raise DaemonUnavailable(_socket_path_mismatch(self.path, hello["session"], exc)) \
                    from None
            raise DaemonUnavailable(self._unavailable(f"session socket: {exc}")) from None
        self._stop = threading.Event()
        self._beat = threading.Thread(target=_heartbeat, name="shimmy-heartbeat", daemon=True,
                                      args=(weakref.ref(self), self._session, self._stop,
                                            self.heartbeat_interval))
        self._beat.start()

    def _unavailable(self, why: str) -> str:
        return (f"shimmy daemon not reachable at {self.path} ({why}); start one with "
                f"`shimmy daemon --socket {self.path}` or point $SHIMMY_DAEMON at its socket")

    def _connect(self) -> socket.socket:
        """A control connection.  Nobody listening, or a full backlog (a daemon out of
        descriptors pausing its accepts), fails at once."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(REQUEST_TIMEOUT)
        try:
            sock.connect(self.path)
        except (ConnectionRefusedError, FileNotFoundError):
            sock.close()
            raise DaemonUnavailable(self._unavailable("nobody listens on the socket")) from None
        except BlockingIOError:   # a unix listener's backlog is full: no wait is offered
            sock.close()
            raise DaemonUnavailable(self._unavailable(
                "its backlog of connections is full: the daemon is under a flood of "
                "connections or out of descriptors; try again")) from None
        except OSError as exc:
            sock.close()
            raise DaemonUnavailable(self._unavailable(f"cannot connect: {exc}")) from None
        return sock   # the timeout stays: a send to a daemon that stopped reading is bounded

    def _drop_connection(self) -> None:
        """Forget the control connection (it may hold half a request or an unread reply); the
        next request connects afresh."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def request(self, op: str, **fields) -> dict:
        """Send one request and wait (bounded) for its reply; raise the reply's error."""
        req_id = next(self._ids)
        fields.update(v=PROTOCOL_VERSION, id=req_id, op=op)
        if op != "hello":
            fields["client"] = self.id
            fields["token"] = self._token
        with self._lock:
            if self.closed:
                raise DaemonUnavailable(self._unavailable("client closed"))
            if self._sock is None:
                self._sock = self._connect()
            deadline = time.monotonic() + REQUEST_TIMEOUT
            try:
                self._sock.sendall(frame(msgpack.packb(fields)))
                sent = None
            except OSError as exc:
                # The daemon may have refused the connection with a reply before closing it
                # (a quota on control connections): that reply says why; read it if it is there.
                sent = exc
                deadline = time.monotonic() + 0.5
            try:
                payload = read_frame(self._sock, deadline)
            except OSError as exc:
                self._drop_connection()
                why = sent or exc
                raise DaemonUnavailable(self._unavailable(
                    f"no reply to {op!r} within {REQUEST_TIMEOUT} s"
                    if isinstance(why, TimeoutError) else
                    f"the daemon went away before it answered {op!r}"
                    if isinstance(why, ConnectionError) else
                    f"{type(why).__name__} on the connection: {why}")) from None
            try:
                reply = msgpack.unpackb(payload, raw=False)
            except Exception as exc:   # msgpack's errors have no common base but Exception
                reply = exc
            if not isinstance(reply, dict) or reply.get("id") not in (req_id, None) \
                    or sent is not None:
                self._drop_connection()   # out of step with the daemon: start clean next time
            if not isinstance(reply, dict):
                raise ProtocolError(f"daemon reply to {op!r} is not a msgpack map "
                                    f"({type(reply).__name__})")
        if reply.get("v") != PROTOCOL_VERSION:
            raise ProtocolError(f"daemon speaks protocol {reply.get('v')}, "
                                f"this SDK {PROTOCOL_VERSION}")
        if not reply.get("ok"):
            err = reply.get("error") or {}
            raise error_from_reply(err.get("code", "error"), err.get("message", "unknown error"))
        return reply

    def _abandon(self) -> None:
        """In a forked child: forget the parent's connection without telling the daemon."""
        self.closed = True
        for sock in (self._session, self._sock):
            try:
                if sock is not None:
                    sock.close()   # our copy only: the parent's connections stay open
            except OSError:
                pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._stop.set()
        try:
            self._session.send(GOODBYE)  # a clean exit, not a crash, in the daemon's counters
        except OSError:
            pass
        self._session.close()
        self._drop_connection()


def _socket_path_mismatch(path: str, session: str, exc: OSError) -> str:
    """The error for a client that reached the daemon's control socket under another path than
    the daemon's own (a container mounting the socket directory elsewhere)."""
    return (f"the shimmy daemon answering at {path} serves its session socket at {session}, "
            f"which this process cannot open ({exc.strerror or exc}): the daemon's socket "
            f"directory must be mounted at the same path in the daemon and in every client "
            f"(here {os.path.dirname(path)}, in the daemon {os.path.dirname(session)}); see "
            f"'The socket path contract' in docs/containers.md")


def _heartbeat(ref, sock: socket.socket, stop: threading.Event, interval: float) -> None:
    """Send one byte per interval; notice the daemon going away (EOF) within one interval."""
    poller = select.poll()   # not select(): the process may hold descriptors past FD_SETSIZE
    poller.register(sock, select.POLLIN)
    while not stop.is_set():
        try:
            readable = poller.poll(int(interval * 1000))
            if readable and not sock.recv(64):
                raise ConnectionResetError("daemon closed the session")
            sock.send(b"h")
        except (OSError, ValueError):
            client = ref()
            if client is not None and not stop.is_set():
                client.closed = True   # the next get_client() says hello to a new daemon
            return
        if ref() is None:
            return


# -- opening the daemon's shared-memory objects ----------------------------------------------------
SHM_DIR = "/dev/shm"   # where Linux keeps POSIX shared memory and named semaphores


def open_shared_memory(name: str) -> posix_ipc.SharedMemory:
    """Open the daemon-made shared-memory object ``name``; a refusal by the kernel is
    :class:`~shimmy.PermissionDenied` naming the path, its owner and mode, and the remedy."""
    try:
        return posix_ipc.SharedMemory(name)
    except posix_ipc.PermissionsError:
        raise _denied(os.path.join(SHM_DIR, name.lstrip("/")), "shared memory") from None
    except posix_ipc.ExistentialError:
        raise _gone(os.path.join(SHM_DIR, name.lstrip("/")), "shared memory") from None
    except OSError as exc:
        raise _translated(exc, os.path.join(SHM_DIR, name.lstrip("/"))) from None


def open_semaphore(name: str) -> posix_ipc.Semaphore:
    """Open the daemon-made named semaphore ``name``, translating errors like
    :func:`open_shared_memory`."""
    try:
        return posix_ipc.Semaphore(name)
    except posix_ipc.PermissionsError:
        raise _denied(os.path.join(SHM_DIR, "sem." + name.lstrip("/")), "semaphore") from None
    except posix_ipc.ExistentialError:
        raise _gone(os.path.join(SHM_DIR, "sem." + name.lstrip("/")), "semaphore") from None
    except OSError as exc:
        raise _translated(exc, os.path.join(SHM_DIR, "sem." + name.lstrip("/"))) from None


def _gone(path: str, what: str) -> ChannelRetired:
    """The daemon named an object that is no longer there: it removed it since its reply."""
    return ChannelRetired(f"the {what} {path} is gone: its daemon removed it after naming it (the "
                          f"channel was deleted, or the daemon restarted and swept it); open the "
                          f"channel again")


def _denied(path: str, what: str) -> PermissionDenied:
    try:
        st = os.stat(path)
        whose = (f"it belongs to uid {st.st_uid} gid {st.st_gid} with mode "
                 f"{stat.S_IMODE(st.st_mode):04o}")
    except OSError:
        whose = "it cannot be inspected"
    return PermissionDenied(
        f"cannot open {what} {path} as uid {os.geteuid()} (groups "
        f"{sorted({os.getegid(), *os.getgroups()})}): {whose}; run the application as the "
        f"owner or in the group the daemon shares with (daemon settings channel_group, "
        f"channel_rules, socket_group; docs/security.md)")


def _translated(exc: OSError, path: str) -> Exception:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return _denied(path, "object")
    if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EMFILE, errno.ENFILE):
        return LimitExceeded(f"cannot open {path}: {exc.strerror} (errno "
                             f"{errno.errorcode.get(exc.errno or 0, exc.errno)})")
    return exc
