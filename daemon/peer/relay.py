"""The peer relay's C fast paths (shimmy/_relaycore.c): loading them, and refusing them when they
disagree with the Python side.

``MirrorSource`` and ``MirrorReplica`` (mirror.py) subclass ``SourceBase`` and ``ReplicaBase``:
the C module's types where it is built, else classes without fast paths.  Its ``pump`` runs a
mirror's sleeps and plain batches over a TCP link and ``land`` a replica's whole batch from the
link's read-ahead buffer; every other case stays in Python, which is also the whole relay where
the module is not built, with SHIMMY_PURE_PYTHON=1, on TLS links and over RDMA.  The module
hard-codes the ring's offsets and the peer wire's header: both are compared here at import, so
a drift refuses it instead of corrupting a replica.
"""

from __future__ import annotations

from typing import Any

from shimmy.ring import layout, native

from . import tcp

_core: Any = native.load("shimmy._relaycore")
ACCELERATED = _core is not None


class _PythonOnly:
    """The base of a relay half where the C module is not loaded: no fast path."""


ReplicaBase: Any = _core.ReplicaCore if _core else _PythonOnly
SourceBase: Any = _core.SourceCore if _core else _PythonOnly

# What ``SourceCore.pump`` returns.
PUMP_PYTHON = 0    # a case for Python: run one turn of MirrorSource's own loop
PUMP_RETIRED = 1   # the daemon retired the ring (its channel was deleted)
PUMP_STOPPED = 2   # stopped, or the ring was unmapped
PUMP_FAILED = 3    # a send failed (``_errno``): the link is broken
PUMP_CLOSED = 4    # the link or the transport was closed

if _core is not None:
    _expected: dict[str, int | None] = {
        name: getattr(layout, name) for name in ("OFF_RETIRED", "OFF_TAIL", "OFF_HEAD",
                                                 "OFF_LAST", "OFF_WAITING", "CONTROL_SIZE",
                                                 "HEADER", "WIDE_BIT")}
    _expected.update(HDR_SIZE=tcp.HDR.size, K_PUT=tcp.K_PUT, K_COMMIT=tcp.K_COMMIT,
                     PUMP_PYTHON=PUMP_PYTHON, PUMP_RETIRED=PUMP_RETIRED,
                     PUMP_STOPPED=PUMP_STOPPED, PUMP_FAILED=PUMP_FAILED, PUMP_CLOSED=PUMP_CLOSED)
    native.check_layout({name: getattr(_core, name, -1) for name in _expected}, _expected,
                 "shimmy._relaycore")
