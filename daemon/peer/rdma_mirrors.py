"""Which transport each mirror runs over, and the RDMA half of the mirror handshake.

The peer module asks this module at three points: the replica side builds its ``mirror``
request (:meth:`RdmaMirrors.offer`: register the replica ring, offer the QP), the source side
answers it (:meth:`RdmaMirrors.source_transport`: RDMA or TCP), and ``{"t": "rdma", "k": ...}``
control messages arrive (:meth:`RdmaMirrors.on_ctrl`, on the main thread; ``guard`` alone
:meth:`RdmaMirrors.on_guard`, on the link's reader thread, as it only wakes the mirror source
that waits for it).  Every decision not to use RDMA is logged with its reason, counted in
``rdma_fallbacks`` and shown on the mirror (``ls`` / ``stat``).

It reaches the replica side only through ``ReplicaControl`` (look a replica up, restart its
mirror) and the replica ring only through its ``ReplicaSink``; it never changes the daemon's
books itself.

Control messages (over the authenticated peer link), ``k`` =
  ``accept``   source -> replica: the source's QP details; the replica connects its QP
  ``refused``  source -> replica: the source stays on TCP (``reason``); replica deregisters
  ``ready``    replica -> source: the replica QP is in RTS; data may flow
  ``guard``    replica -> source: the replica's head after a GUARD record (``head``)
  ``down``     source -> replica: the source's QP failed (``reason``); the replica re-requests
  ``rx_down``  replica -> source: the replica's side failed (``reason``); the source stops
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Protocol

from shimmy import ring

from . import rdma
from .tcp import TcpTransport

if TYPE_CHECKING:
    from .replicas import ReplicaEntry

log = logging.getLogger("shimmy.peer")


class ReplicaControl(Protocol):
    """What of the replica side RDMA uses (``replicas.ReplicaSide``)."""

    def get(self, name: str) -> ReplicaEntry | None: ...

    def restart(self, entry: ReplicaEntry) -> None:
        """Detach the replica's mirror and ask for a new one (main thread)."""


class RdmaMirrors:
    def __init__(self, s, counters: dict, replicas: ReplicaControl,
                 call_soon: Callable[..., None]):
        self.counters = counters
        self.replicas = replicas
        self.call_soon = call_soon      # runs a function on the daemon's main thread
        self.setting = s.transport
        self.device = s.rdma_device
        self.threshold = s.rdma_small_write_threshold
        self.timeout = s.peer_link_timeout
        if self.setting == "tcp":
            self.ok, self.reason = False, "transport=tcp"
        else:
            self.ok, self.reason = rdma.available(self.device)
        counters.setdefault("rdma_fallbacks", 0)
        counters["rdma_mirrors"] = 0
        counters["rdma_failures"] = 0
        self.receivers: dict[str, rdma.RdmaReceiver] = {}
        self.rx_mid: dict[tuple[int, int], str] = {}
        self.sources: dict[tuple[int, int], rdma.RdmaTransport] = {}
        self.failures: dict[str, int] = {}
        if self.ok:
            log.info("peer transport: %s; RDMA device %s", self.setting, self.reason)
        else:
            log.info("peer transport: tcp (RDMA not used: %s)", self.reason)

    def _fallback(self, what: str, reason: str) -> None:
        self.counters["rdma_fallbacks"] += 1
        if self.ok:   # a device exists and failed, or the peer cannot: worth a warning each time
            log.warning("rdma: %s falls back to TCP: %s", what, reason)
        else:         # no usable device at all: said once at start (INFO), counted per mirror
            log.debug("rdma: %s runs over TCP: %s", what, reason)

    # -- replica side ------------------------------------------------------------------------------
    def offer(self, entry, rec) -> dict | None:
        """Register the replica ring and return the QP offer for the ``mirror`` request, or None
        (the mirror runs over TCP; the reason is on the replica's ``transport``)."""
        self.release(entry.name)
        kind, why = rdma.choose(self.setting, self.ok, True)
        if kind == "rdma" and self.failures.get(entry.name, 0) >= rdma.RDMA_RETRIES:
            kind, why = "tcp", f"{self.failures[entry.name]} RDMA failures on this mirror"
        if kind == "tcp":
            if self.setting != "tcp":
                self._fallback(f"replica {entry.name}", why)
            entry.sink.transport = {"kind": "tcp", "fallback": why}
            return None
        link, mid, name = entry.link, entry.mid, entry.name
        # An RDMA mirror places bytes from our tail (a put of an earlier mirror that was never
        # committed is dropped; TCP mirrors do this in MirrorReplica.put_target / jump).
        entry.sink.drop_uncommitted()

        def on_guard(head: int) -> None:
            # The receiver's completion thread: straight onto the link, not through the link's
            # writer (the source sends nothing more until it has this).
            link.send_ctrl_now({"t": "rdma", "k": "guard", "id": mid, "head": head})

        def on_failure(reason: str) -> None:
            self.call_soon(self._replica_failed, name, mid, reason, True)

        try:
            rx = rdma.RdmaReceiver(self.device, entry.sink, rec.view, self.threshold, on_guard,
                                   on_failure)
        except rdma.RdmaSetupError as exc:
            self._fallback(f"replica {name}", str(exc))
            entry.sink.transport = {"kind": "tcp", "fallback": str(exc)}
            return None
        self.receivers[name] = rx
        self.rx_mid[(link.id, mid)] = name
        entry.sink.transport = {**rx.describe(), "kind": "rdma (offered)"}
        return rx.offer()

    def release(self, name: str) -> None:
        rx = self.receivers.pop(name, None)
        if rx is None:
            return
        for key, n in list(self.rx_mid.items()):
            if n == name:
                del self.rx_mid[key]
        rx.stop()

    def _replica_failed(self, name: str, mid: int, reason: str, notify: bool) -> None:
        entry = self.replicas.get(name)
        if entry is None or entry.mid != mid:
            return
        self.failures[name] = self.failures.get(name, 0) + 1
        self.counters["rdma_failures"] += 1
        again = "a new QP" if self.failures[name] < rdma.RDMA_RETRIES else "TCP"
        log.warning("rdma: replica %s: %s; restarting the mirror over %s from tail %d", name,
                    reason, again, entry.sink.tail)
        if notify and entry.link is not None:
            entry.link.send_ctrl({"t": "rdma", "k": "rx_down", "id": mid, "reason": reason})
        self.replicas.restart(entry)

    # -- source side -------------------------------------------------------------------------------
    def source_transport(self, link, mid: int, rec, offer):
        """The transport for a mirror the peer asked for: RDMA when it offered and we can."""
        for key in [k for k, t in self.sources.items() if t.closed]:
            del self.sources[key]
        kind, why = rdma.choose(self.setting, self.ok, offer is not None)
        transport = None
        if kind == "rdma":
            try:
                transport = rdma.RdmaTransport(self.device, link, mid, rec.view, offer,
                                               self.threshold, rec.mode == ring.MODE_RELIABLE,
                                               self.timeout)
            except (rdma.RdmaSetupError, ValueError) as exc:
                why = str(exc)
        if transport is None:
            if offer is not None:
                link.send_ctrl({"t": "rdma", "k": "refused", "id": mid, "reason": why})
            tcp = TcpTransport(link, mid)
            if self.setting != "tcp":
                self._fallback(f"mirror {rec.name} to {link.remote}", why)
                tcp.fallback = why
            return tcp
        self.sources[(link.id, mid)] = transport
        self.counters["rdma_mirrors"] += 1
        link.send_ctrl({"t": "rdma", "k": "accept", "id": mid, **transport.accept()})
        return transport

    # -- control messages (main thread) ------------------------------------------------------------
    def on_ctrl(self, link, obj: dict) -> None:
        k, mid = obj["k"], int(obj["id"])
        key = (link.id, mid)
        if k in ("accept", "refused", "down"):          # we are the replica
            name = self.rx_mid.get(key)
            if name is None:
                return
            rx = self.receivers[name]
            entry = self.replicas.get(name)
            if k == "accept":
                try:
                    rx.connect(obj)
                except (rdma.RdmaSetupError, ValueError) as exc:
                    self._replica_failed(name, mid, f"connect: {exc}", notify=True)
                    return
                if entry is not None:
                    entry.sink.transport = rx.describe()
                link.send_ctrl({"t": "rdma", "k": "ready", "id": mid})
            elif k == "refused":
                self.release(name)
                self._fallback(f"replica {name}", f"source refused: {obj.get('reason')}")
                if entry is not None:
                    entry.sink.transport = {"kind": "tcp", "fallback": str(obj.get("reason"))}
            else:
                self._replica_failed(name, mid, f"source: {obj.get('reason')}", notify=False)
        elif k in ("ready", "rx_down"):                 # we are the source
            t = self.sources.get(key)
            if t is None:
                return
            if k == "ready":
                t.ready()
            else:
                t.fail(f"replica: {obj.get('reason')}")
        else:   # ``guard`` never comes here: PeerService.on_link_ctrl hands it to on_guard
            raise ValueError(f"unknown rdma message {k!r}")

    def on_guard(self, link, obj: dict) -> None:
        """``guard``: the replica's head after a GUARD record, for the source thread waiting in
        ``RdmaTransport._write`` (any thread: it only sets that transport's event)."""
        head = int(obj["head"])
        t = self.sources.get((link.id, int(obj["id"])))
        if t is not None:
            t.guard_acked_to(head)

    def shutdown(self) -> None:
        for name in list(self.receivers):
            self.release(name)
        for t in self.sources.values():
            t.close()
        self.sources.clear()
