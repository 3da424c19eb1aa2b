"""One control request in, one reply out: the frame decoded and checked (protocol version, id, op),
the operation's handler called, every failure turned into an error reply that names what was
wrong, and each request counted (by op and error code, for ``stat`` and /metrics).

It must never let an exception out (the loop goes on whatever a client sends: a frame that is
not one msgpack map gets an error and its connection is closed, daemon/control.py), and it holds
no operation's logic: the handlers are ``operations`` (channels, the node) and ``streams``.
``field`` and ``show`` are the checks and the quoting every handler uses on request fields.
"""

from __future__ import annotations

import errno
import logging
from typing import TYPE_CHECKING, Callable

import msgpack

from shimmy.errors import InvalidArgument, LimitExceeded, ProtocolError, ShimmyError
from shimmy.protocol import PROTOCOL_VERSION

from . import metrics
from .control import Conn
from .sessions import RESOURCE_ERRNOS

if TYPE_CHECKING:
    from .server import Daemon

log = logging.getLogger("shimmy.daemon")
ID_MAX = (1 << 63) - 1


class Dispatch:
    """The control listener's request handler (``handle``) for daemon ``d``."""

    def __init__(self, d: Daemon):
        self.d = d
        self.ops: dict[str, Callable[[dict], dict]] = {}   # op name -> handler
        self.conn: Conn | None = None   # the control connection of the request being handled

    def handle(self, payload: bytes, conn: Conn) -> tuple[dict, bool]:
        """The reply to one request frame, and whether its connection is to be closed after it
        (a frame that is not one msgpack map: spec/control.md, "Framing")."""
        req_id, reply, close = self._answer(payload, conn)
        reply["v"] = PROTOCOL_VERSION
        reply["id"] = req_id
        return reply, close

    def _answer(self, payload: bytes, conn: Conn):
        self.d.counters["requests"] += 1
        req_id = None
        op_label = metrics.OP_MALFORMED   # the metrics label until the op is known
        close = True                      # until the payload is known to be one map
        try:
            try:
                # Size is already bounded by request_max_bytes (daemon/control.py).
                req = msgpack.unpackb(payload, raw=False, strict_map_key=True)
            except Exception as exc:
                raise ProtocolError(f"request is not one msgpack map: {type(exc).__name__}: "
                                    f"{show(str(exc))}") from None
            if not isinstance(req, dict):
                raise ProtocolError(f"request must be a msgpack map, got {type(req).__name__}")
            close = False
            rid = req.get("id")
            req_id = rid if isinstance(rid, int) and not isinstance(rid, bool) \
                and 0 <= rid <= ID_MAX else None
            if req.get("v") != PROTOCOL_VERSION:
                raise ProtocolError(f"client speaks control protocol v{show(req.get('v'))}; "
                                    f"this daemon speaks v{PROTOCOL_VERSION}")
            if "id" in req and req_id is None:
                raise InvalidArgument(f"field 'id' must be an int in 0..{ID_MAX}, got "
                                      f"{show(req.get('id'))}")
            op = req.get("op")
            handler = self.ops.get(op) if isinstance(op, str) else None
            if handler is None:
                raise ProtocolError(f"unknown op {show(op)}; known: {sorted(self.ops)}")
            op_label = str(op)
            self.conn = conn   # the kernel's word on who sent it (op_hello reads it)
            result = handler(req)
            result["ok"] = True
            self.d.control_stats.count(op_label)
            return req_id, result, close
        except ShimmyError as exc:
            self.d.control_stats.count(op_label, exc.code)
            self.d.counters["errors"] += 1
            if isinstance(exc, ProtocolError):
                self.d.counters["malformed"] += 1
            return req_id, self._error(exc), close
        except OSError as exc:
            self.d.counters["errors"] += 1
            if exc.errno in RESOURCE_ERRNOS or exc.errno == errno.ENOSPC:
                # Out of descriptors or memory right now: the client may retry; nothing broke.
                log.warning("request refused for lack of resources: %s", exc)
                return req_id, self._error(LimitExceeded(
                    f"the daemon is out of resources ({exc.strerror}; {self.d.sessions.open_fds()} "
                    f"session and {self.d.control.open_fds()} control connections, nofile limit "
                    f"{self.d.nofile[0]}); try again")), close
            log.exception("internal error handling a request")
            return req_id, self._error(ShimmyError(
                f"internal daemon error: {type(exc).__name__}: {exc}")), close
        except Exception as exc:  # a bug must not take the node's channels down with it
            self.d.control_stats.count(op_label, metrics.CODE_INTERNAL)
            self.d.counters["errors"] += 1
            log.exception("internal error handling a request")
            return req_id, self._error(ShimmyError(
                f"internal daemon error: {type(exc).__name__}: {exc}")), close

    @staticmethod
    def _error(exc: ShimmyError) -> dict:
        return {"ok": False, "error": {"code": exc.code, "message": str(exc)}}


def field(req: dict, key: str, kind, optional: bool = False, lo: int | None = None,
          hi: int | None = None):
    """``req[key]`` checked for type (and, for ints, for the range lo..hi)."""
    value = req.get(key)
    if value is None and optional:
        return None
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise InvalidArgument(f"field {key!r} must be {getattr(kind, '__name__', kind)}, "
                              f"got {type(value).__name__}")
    if kind is int and ((lo is not None and value < lo) or (hi is not None and value > hi)):
        raise InvalidArgument(f"field {key!r} must be in {lo}..{hi}, got {show(value)}")
    if kind is str and len(value) > 256:
        raise InvalidArgument(f"field {key!r} is {len(value)} characters; at most 256")
    return value


def show(value) -> str:
    """A request value for an error message, shortened (it came from anyone)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
