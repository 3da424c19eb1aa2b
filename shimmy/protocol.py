"""The daemon's control protocol (version 2): framed msgpack maps over a unix stream socket.

Every request and every reply is one frame: a 4-byte little-endian unsigned length N, then N bytes
holding exactly one msgpack map.  Any number of requests may go over one connection; replies come
in the order the requests arrived.

Request:  ``{"v": PROTOCOL_VERSION, "id": int, "op": str, ...op fields}``
Reply:    ``{"v": PROTOCOL_VERSION, "id": same, "ok": True, ...result}``
       or ``{"v": PROTOCOL_VERSION, "id": same, "ok": False,
             "error": {"code": str, "message": str}}``

Error codes are the ``code`` attributes of the classes in :mod:`shimmy.errors`.  The full list of
operations and their fields, and the rules for frames, are in ``spec/control.md``.  A second,
plain unix socket beside the control socket (``session_path``) carries each client's liveness:
the client connects once per process, sends its session token, then one heartbeat byte per
heartbeat interval; the daemon learns the client's pid/uid from the socket's peer credentials
and sees a crash as end-of-file.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import time

PROTOCOL_VERSION = 2
DEFAULT_SOCKET = "/run/shimmy/shimmyd.sock"
ENV_SOCKET = "SHIMMY_DAEMON"
FRAME_HEADER = struct.Struct("<I")   # a frame's length, before its msgpack map


def resolve_socket(path: str | None) -> str:
    """The control socket path: explicit argument, then $SHIMMY_DAEMON, then the default."""
    return os.path.abspath(path or os.environ.get(ENV_SOCKET) or DEFAULT_SOCKET)


def session_path(socket_path: str) -> str:
    return socket_path + ".session"


def frame(payload: bytes) -> bytes:
    """``payload`` (one packed msgpack map) as a frame."""
    return FRAME_HEADER.pack(len(payload)) + payload


def read_frame(sock: socket.socket, deadline: float, max_bytes: int = 1 << 30) -> bytes:
    """The payload of the next frame on the blocking stream ``sock``; ``TimeoutError`` at the
    monotonic ``deadline``, ``ConnectionError`` on end-of-file or a length over ``max_bytes``."""
    head = _read_exactly(sock, FRAME_HEADER.size, deadline)
    (size,) = FRAME_HEADER.unpack(head)
    if size > max_bytes:
        raise ConnectionError(f"frame of {size} bytes; at most {max_bytes}")
    return _read_exactly(sock, size, deadline)


def _read_exactly(sock: socket.socket, n: int, deadline: float) -> bytes:
    buf = bytearray()
    poller = select.poll()   # not select(): a process may hold descriptors past FD_SETSIZE
    poller.register(sock, select.POLLIN)
    while len(buf) < n:
        left = deadline - time.monotonic()
        if left <= 0 or not poller.poll(max(1, int(left * 1000))):
            raise TimeoutError("no reply in time")
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionResetError("the daemon closed the connection")
        buf += chunk
    return bytes(buf)
