"""The replica end of one RDMA mirror (``RdmaReceiver``): registers the replica ring's data area
(remote write) and a mailbox, posts a receive per mailbox slot, offers the queue pair, and runs
the completion thread that turns each record, in sequence order, into calls on the replica's
sink (``landed``/``commit``, ``put_target``, ``jump``, ``advance_head``).

It must never write the ring but through the sink (into the views ``put_target`` hands it; the
sink owns the replica's words and their order), never take a record out of sequence, and never
touch the daemon's books: a failure goes to ``on_failure`` (``RdmaMirrors``, peer/rdma_mirrors.py),
which restarts the mirror on the main thread.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

from .device import RdmaSetupError
from .endpoint import Endpoint, mapping_address, slot_view
from .wire import (ACCEPT_FIELDS, OP_COMMIT, OP_GUARD, OP_JUMP, OP_PUT_COMMIT, REC, REC_AREA,
                   SLOTS, check_fields, wc_error)

log = logging.getLogger("shimmy.peer")


class RdmaReceiver:
    """Replica end of one RDMA mirror: ring + mailbox MRs, posted receives, a completion thread
    that turns records into ``MirrorReplica`` calls in order."""

    def __init__(self, wanted: str, sink, view, threshold: int,
                 on_guard: Callable[[int], None], on_failure: Callable[[str], None]):
        self.sink, self.view = sink, view
        self.on_guard, self.on_failure = on_guard, on_failure
        self.ep = Endpoint(wanted, 4, SLOTS, 1)
        try:
            payload = min(max(threshold, 0), self.ep.path_mtu_bytes(self.ep.mtu) - REC_AREA)
            self.slot_size = REC_AREA + (payload + 63) // 64 * 64
            if self.slot_size > self.ep.path_mtu_bytes(self.ep.mtu):
                self.slot_size -= 64
            # Only the data area is remotely writable: the control page and the subscribers'
            # slots stay out of the peer's reach.
            self.ring_addr = mapping_address(view.mm) + view.data_offset
            self.ring_mr = self.ep.register(self.ring_addr, view.capacity, True,
                                            f"replica ring {view.name}")
            self.box_mr = self.ep.register(None, SLOTS * self.slot_size, True, "mailbox")
            self.box = slot_view(self.box_mr, SLOTS * self.slot_size)
            from pyverbs.wr import SGE, RecvWR
            self._recv = [RecvWR(wr_id=i, num_sge=1,
                                 sg=[SGE(self.box_mr.buf + i * self.slot_size, 8,
                                         self.box_mr.lkey)]) for i in range(SLOTS)]
            for wr in self._recv:
                self.ep.qp.post_recv(wr)
        except RdmaSetupError:
            self.ep.close()
            raise
        except Exception as exc:
            self.ep.close()
            raise RdmaSetupError("post receives", str(exc)) from None
        self.seq = 0
        self.stopping = False
        self.info = {"kind": "rdma", "records": 0, **self.ep.describe()}   # live, for stat
        self.thread: threading.Thread | None = None
        log.info("rdma: replica %s registered %d bytes (%s) in %.1f ms on %s", view.name,
                 self.ep.pinned, "odp" if self.ep.odp else "pinned", self.ep.reg_seconds * 1e3,
                 self.ep.describe()["device"])

    def offer(self) -> dict:
        return {**self.ep.info(), "ring_addr": self.ring_addr, "ring_rkey": self.ring_mr.rkey,
                "ring_len": self.view.capacity, "box_addr": self.box_mr.buf,
                "box_rkey": self.box_mr.rkey, "slots": SLOTS, "slot_size": self.slot_size,
                "head": self.sink.head}

    def connect(self, remote: dict) -> None:
        self.ep.connect(check_fields(remote, ACCEPT_FIELDS, "rdma accept"))
        self.thread = threading.Thread(target=self._run, name=f"rdma-rx-{self.view.name}",
                                       daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.ep.wait(lambda: self.stopping, self._on_wc)
        except Exception as exc:
            if not self.stopping:
                reason = str(exc) if isinstance(exc, _Failure) else f"{type(exc).__name__}: {exc}"
                log.warning("rdma: replica %s: %s; tearing the mirror down", self.view.name,
                            reason)
                self.stopping = True
                self.on_failure(reason)

    def _on_wc(self, wc) -> None:
        if self.stopping:
            return
        e = self.ep.e
        if wc.status != e.IBV_WC_SUCCESS:
            raise _Failure(wc_error(wc.status, "receive completion"))
        if wc.opcode != e.IBV_WC_RECV_RDMA_WITH_IMM:
            raise _Failure(f"receive completion: unexpected opcode {wc.opcode}")
        seq = self.seq
        slot = wc.wr_id
        if slot != seq % SLOTS or wc.imm_data != seq & 0xFFFFFFFF:
            raise _Failure(f"record {wc.imm_data} in slot {slot}, expected {seq}")
        at = slot * self.slot_size
        op, rseq, a, b, c, d, x = REC.unpack_from(self.box, at)
        if rseq != seq & 0xFFFFFFFF:
            raise _Failure(f"mailbox slot {slot} holds record {rseq}, expected {seq}")
        sink = self.sink
        try:
            if op == OP_COMMIT:
                sink.landed(a)
                sink.commit(a, b, c)
            elif op == OP_PUT_COMMIT:
                views = sink.put_target(a, b, c)
                p = at + REC_AREA
                for v in views:
                    v[:] = self.box[p:p + len(v)]
                    p += len(v)
                sink.commit(b, d, x)
            elif op == OP_JUMP:
                sink.jump(a, b)
            elif op == OP_GUARD:
                self.on_guard(sink.advance_head(a, b))
            else:
                raise _Failure(f"record {seq}: unknown op {op}")
        except _Failure:
            raise
        except Exception as exc:
            raise _Failure(f"record {seq} (op {op}): {exc}") from None
        self.seq = seq + 1
        self.info["records"] += 1
        self.ep.qp.post_recv(self._recv[slot])

    def stop(self) -> None:
        """Stop the thread (QP to error flushes the receives and wakes it), deregister all."""
        self.stopping = True
        self.ep.to_error()
        if self.thread is not None and self.thread is not threading.current_thread():
            self.thread.join(2.0)
        if self.thread is None or not self.thread.is_alive():
            self.ep.close()

    def describe(self) -> dict:
        return self.info


class _Failure(Exception):
    """An RDMA mirror step failed (message names the step and the reason)."""
