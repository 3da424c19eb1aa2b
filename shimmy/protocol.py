"""The daemon's control protocol: msgpack maps over a ZeroMQ DEALER/ROUTER pair.

Request:  ``{"v": PROTOCOL_VERSION, "id": int, "op": str, ...op fields}``
Reply:    ``{"v": PROTOCOL_VERSION, "id": same, "ok": True, ...result}``
       or ``{"v": PROTOCOL_VERSION, "id": same, "ok": False,
             "error": {"code": str, "message": str}}``

Error codes are the ``code`` attributes of the classes in :mod:`shimmy.errors`.  The full list of
operations and their fields is in ``docs/protocol.md``.  A second, plain unix socket beside the
control socket (``session_path``) carries each client's liveness: the client connects once per
process, sends its session token, then one heartbeat byte per heartbeat interval; the daemon
learns the client's pid/uid from the socket's peer credentials and sees a crash as end-of-file.
"""

from __future__ import annotations

import os

PROTOCOL_VERSION = 1
DEFAULT_SOCKET = "/run/shimmy/shimmyd.sock"
ENV_SOCKET = "SHIMMY_DAEMON"


def resolve_socket(path: str | None) -> str:
    """The control socket path: explicit argument, then $SHIMMY_DAEMON, then the default."""
    return os.path.abspath(path or os.environ.get(ENV_SOCKET) or DEFAULT_SOCKET)


def session_path(socket_path: str) -> str:
    return socket_path + ".session"


def endpoint(socket_path: str) -> str:
    return "ipc://" + socket_path
