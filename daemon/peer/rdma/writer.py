"""The source end of one RDMA mirror (``RdmaTransport``, a ``Transport``): RDMA WRITEs from the
local ring straight into the replica's ring, each batch closed by a record in the replica's
mailbox; small ranges copied through the mailbox; the lossy guard before a WRITE may land where
the replica's readers still read.

It runs on the mirror source's thread (``put``, ``commit``, ``jump``) and takes the link's
events (``ready``, ``guard_acked_to``, ``fail``) from other threads.  It must never place a byte
at or past the acknowledged replica head plus a ring's capacity, and never let ``put`` return in
lossy mode before the adapter has read the source bytes (the mirror's seqlock check after
``put`` relies on it).
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
from typing import Any, Sequence

from ..transport import Transport, TransportClosed
from .device import RdmaSetupError
from .endpoint import Endpoint, mapping_address, slot_view
from .wire import (OFFER_FIELDS, OP_COMMIT, OP_GUARD, OP_JUMP, OP_PUT_COMMIT, REC, REC_AREA,
                   SLOTS, check_fields, guard_request, split_range, uses_cpu_path, wc_error)

log = logging.getLogger("shimmy.peer")
FAULT_ENV = "SHIMMY_RDMA_FAULT_AFTER"  # lab fault injection: QP to error after N records


class RdmaTransport(Transport):
    """Source end: RDMA WRITEs from the local ring into the remote replica's ring."""

    kind = "rdma"

    def __init__(self, wanted: str, link, mirror_id: int, view, remote: dict, threshold: int,
                 reliable: bool, timeout: float):
        self.link, self.mid, self.v = link, mirror_id, view
        self.r = check_fields(remote, OFFER_FIELDS, "rdma offer")
        if self.r["ring_len"] != view.capacity:
            raise RdmaSetupError("offer", f"replica ring holds {self.r['ring_len']} bytes, ours "
                                          f"{view.capacity}")
        self.reliable, self.timeout = reliable, timeout
        self.cap = view.capacity
        self.ep = Endpoint(wanted, 3 * SLOTS + 4, 1, 2)
        try:
            self.slot_size = self.r["slot_size"]
            mtu = self.ep.path_mtu_bytes(self.r["mtu"])
            self.threshold = max(0, min(threshold, self.slot_size - REC_AREA, mtu - REC_AREA))
            self.slots = min(self.r["slots"], SLOTS)
            self.ring_addr = mapping_address(view.mm) + view.data_offset   # data area only
            self.ring_mr = self.ep.register(self.ring_addr, view.capacity, False,
                                            f"source ring {view.name}")
            self.stage_mr = self.ep.register(None, self.slots * self.slot_size, False, "staging")
            self.stage = slot_view(self.stage_mr, self.slots * self.slot_size)
            self.ep.connect(self.r)
        except RdmaSetupError:
            self.ep.close()
            raise
        self.seq = 0
        self.inflight = 0
        self.guard_acked = self.r["head"]
        self.failure: str | None = None
        self._closed = False
        self._ready = threading.Event()
        self._guard = threading.Event()
        self._guard_head = -1
        self._small: tuple[int, int, int] | None = None
        self._op = threading.Lock()
        fault = os.environ.get(FAULT_ENV, "")
        self._fault_at = int(fault) if fault.isdigit() else -1
        self.stats = {"writes": 0, "small_writes": 0, "records": 0, "guards": 0}
        link.transports[mirror_id] = self
        log.info("rdma: mirror %s source registered %d bytes (%s) in %.1f ms; small-write "
                 "threshold %d", view.name, self.ep.pinned, "odp" if self.ep.odp else "pinned",
                 self.ep.reg_seconds * 1e3, self.threshold)

    def accept(self) -> dict:
        return self.ep.info()

    @property
    def closed(self) -> bool:
        return self._closed

    # -- events from the link (main thread; guard_acked_to: the link's reader thread) ----------
    def ready(self) -> None:
        self._ready.set()

    def guard_acked_to(self, head: int) -> None:
        self._guard_head = head
        self._guard.set()

    def fail(self, reason: str) -> None:
        """The replica reported a failure: stop at the next step (wakes a blocked wait)."""
        if self.failure is None:
            self.failure = reason
        self.ep.to_error()
        self._ready.set()
        self._guard.set()

    # -- data path (mirror source thread) --------------------------------------------------------
    def _check(self, step: str) -> None:
        if self.failure is not None:
            raise TransportClosed(self.failure)
        if self._closed:
            raise TransportClosed("transport closed")
        if self.link.closed:
            raise TransportClosed(f"link to {self.link.remote} is closed")
        if not self._ready.is_set():
            if not self._ready.wait(self.timeout) or self._closed:
                self._fail(f"{step}: the replica did not confirm its QP within {self.timeout}s")

    def _fail(self, reason: str) -> None:
        if self.failure is None:
            self.failure = reason
            log.warning("rdma: mirror %s to %s: %s; tearing the mirror down (it resumes over a "
                        "new QP or TCP)", self.v.name, self.link.remote, reason)
        self.ep.to_error()
        raise TransportClosed(self.failure)

    def _on_wc(self, wc) -> None:
        if wc.status != self.ep.e.IBV_WC_SUCCESS:
            self._fail(wc_error(wc.status, "RDMA WRITE" if wc.wr_id == 0 else
                                "WRITE_WITH_IMM (record)"))
        self.inflight -= 1

    def _post(self, wr, signalled: int) -> None:
        try:
            self.ep.qp.post_send(wr)
        except Exception as exc:
            self._fail(f"post_send: {exc}")
        self.inflight += signalled

    def _record(self, op: int, a: int, b: int = 0, c: int = 0, d: int = 0, x: int = 0,
                payload: int = 0) -> None:
        """Fill the staging slot's record and post it as one signalled WRITE_WITH_IMM."""
        from pyverbs.wr import SGE, SendWR
        e = self.ep.e
        if self.inflight >= self.slots - 1:
            self.ep.wait(lambda: self.inflight < self.slots - 1, self._on_wc)
        seq = self.seq
        slot = seq % self.slots
        at = slot * self.slot_size
        REC.pack_into(self.stage, at, op, seq & 0xFFFFFFFF, a, b, c, d, x)
        wr = SendWR(wr_id=1, opcode=e.IBV_WR_RDMA_WRITE_WITH_IMM, num_sge=1,
                    sg=[SGE(self.stage_mr.buf + at, REC_AREA + payload, self.stage_mr.lkey)],
                    send_flags=e.IBV_SEND_SIGNALED)
        wr.imm_data = seq & 0xFFFFFFFF
        wr.set_wr_rdma(self.r["box_rkey"], self.r["box_addr"] + at)
        self._post(wr, 1)
        self.seq = seq + 1
        self.stats["records"] += 1
        if self._fault_at >= 0 and self.stats["records"] >= self._fault_at:
            self._fault_at = -1
            log.warning("rdma: %s=%s: moving the QP of mirror %s to the error state", FAULT_ENV,
                        os.environ.get(FAULT_ENV), self.v.name)
            self.ep.to_error()

    def put(self, start: int, views: Sequence[memoryview], guard: int) -> None:
        with self._op:
            self._check("put")
            n = 0
            for v in views:
                n += len(v)
            if uses_cpu_path(n, self.threshold):
                # CPU path: copy into the staging slot now (the mirror's seqlock check after
                # put covers this copy); commit sends record + bytes in one WRITE_WITH_IMM.
                if self.inflight >= self.slots - 1:
                    self.ep.wait(lambda: self.inflight < self.slots - 1,
                                 self._on_wc)
                at = (self.seq % self.slots) * self.slot_size + REC_AREA
                for off, ln in split_range(start, n, self.cap):
                    ctypes.memmove(self.stage_mr.buf + at, self.ring_addr + off, ln)
                    at += ln
                self._small = (start, start + n, guard)
                return
            self._write(start, n)

    def _write(self, start: int, n: int) -> None:
        from pyverbs.wr import SGE, SendWR
        e = self.ep.e
        req = guard_request(start, start + n, self.cap, self.guard_acked, self._credit,
                            self.reliable)
        if req is not None:
            self._guard.clear()
            self._record(OP_GUARD, *req)
            self.stats["guards"] += 1
            if not self._guard.wait(self.timeout):
                self._fail(f"guard: no acknowledgement within {self.timeout}s")
            self._check("guard")
            if self._guard_head < req[0]:
                self._fail(f"guard: replica head {self._guard_head} below {req[0]}")
            self.guard_acked = self._guard_head
        pieces = split_range(start, n, self.cap)
        wait = not self.reliable
        chain: list[Any] = []   # each WR stays referenced until post_send has copied it
        for i, (off, ln) in enumerate(pieces):
            flags = e.IBV_SEND_SIGNALED if (wait and i == len(pieces) - 1) else 0
            w = SendWR(wr_id=0, opcode=e.IBV_WR_RDMA_WRITE, num_sge=1,
                       sg=[SGE(self.ring_addr + off, ln, self.ring_mr.lkey)],
                       send_flags=flags)
            w.set_wr_rdma(self.r["ring_rkey"], self.r["ring_addr"] + off)
            if chain:
                chain[-1].next_wr = w
            chain.append(w)
        self._post(chain[0], 1 if wait else 0)
        self.stats["writes"] += len(pieces)
        if wait:
            # Lossy: the adapter has read the source bytes only when the WRITE completes.
            self.ep.wait(lambda: self.inflight <= 0, self._on_wc)

    def commit(self, tail: int, last: int, pad_until: int = 0) -> None:
        with self._op:
            self._check("commit")
            small, self._small = self._small, None
            if small is not None:
                start, end, guard = small
                self._record(OP_PUT_COMMIT, start, end, guard, last, pad_until,
                             payload=end - start)
                self.stats["small_writes"] += 1
            else:
                self._record(OP_COMMIT, tail, last, pad_until)
            # Reap what is done without blocking (keeps the window open).
            n, wcs = self.ep.cq.poll(16)
            for wc in wcs[:n]:
                self._on_wc(wc)

    def jump(self, position: int, seq: int) -> None:
        with self._op:
            self._check("jump")
            self._small = None   # a put without its commit (a torn batch) is dropped
            self._record(OP_JUMP, position, seq)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._ready.set()
        self._guard.set()
        self.link.transports.pop(self.mid, None)
        if self.failure is not None:
            self.link.send_ctrl({"t": "rdma", "k": "down", "id": self.mid,
                                 "reason": self.failure})
        self.ep.to_error()      # wakes a blocked wait with flushed completions
        if self._op.acquire(timeout=2.0):
            try:
                self.ep.close()
            finally:
                self._op.release()

    def describe(self) -> dict:
        return {"rdma": {**self.ep.describe(), **self.stats, "threshold": self.threshold,
                         "failure": self.failure}}
