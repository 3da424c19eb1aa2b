"""The verbs resources of one end of an RDMA mirror (``Endpoint``): the device context, a protection
domain, a completion channel and queue, one RC queue pair and its connection (INIT, RTR, RTS),
the memory regions it registered, and the wait for completions that releases the GIL; with the
process-wide count of pinned bytes that the RLIMIT_MEMLOCK check reads.

It knows nothing of rings, records or mirrors: it must never interpret what it carries (the
writer and the receiver do).  pyverbs is imported only inside its functions.
"""

from __future__ import annotations

import ctypes
import logging
import os
import random
import resource
import select
import threading
import time
from typing import Any, Callable

from .device import (RdmaSetupError, gid_index, has_ipc_lock, memlock_message, memlock_problem,
                     select_port)

log = logging.getLogger("shimmy.peer")
ACCESS_LOCAL_WRITE, ACCESS_REMOTE_WRITE, ACCESS_ON_DEMAND = 1, 2, 64
WAIT_SLICE = 0.2                    # longest sleep on a completion channel before re-checking
MTU_BYTES = {1: 256, 2: 512, 3: 1024, 4: 2048, 5: 4096}


def mapping_address(mm) -> int:
    """Address of a writable mmap's first byte (the export is released at once)."""
    anchor = ctypes.c_char.from_buffer(mm)
    addr = ctypes.addressof(anchor)
    del anchor
    return addr


_pinned_lock = threading.Lock()
_pinned = 0                         # bytes this process has registered pinned, all mirrors


class Endpoint:
    """Context, PD, completion channel + CQ and one RC QP on the chosen port; MRs it registered."""

    def __init__(self, wanted: str, send_wr: int, recv_wr: int, max_sge: int):
        from pyverbs.cq import CQ, CompChannel
        from pyverbs.device import Context
        from pyverbs.pd import PD
        from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr
        import pyverbs.enums as e

        self.e = e
        self.dev, self.port = select_port(wanted)
        self.gid_index = gid_index(self.dev, self.port)
        self.mrs: list = []
        self.pinned = 0
        self.odp = False
        self.reg_seconds = 0.0
        step = "open device"
        try:
            self.ctx = Context(name=self.dev)
            self.gid = str(self.ctx.query_gid(self.port, self.gid_index))
            self.mtu = int(self.ctx.query_port(self.port).active_mtu)
            step = "protection domain"
            self.pd = PD(self.ctx)
            step = "completion queue"
            before = _event_fds()
            self.channel = CompChannel(self.ctx)
            new = _event_fds() - before
            self.channel_fd = new.pop() if len(new) == 1 else -1
            self.cq = CQ(self.ctx, send_wr + recv_wr + 8, None, self.channel, 0)
            step = "queue pair"
            cap = QPCap(max_send_wr=send_wr, max_recv_wr=recv_wr, max_send_sge=max_sge,
                        max_recv_sge=1)
            # sq_sig_all=0: only WRs flagged IBV_SEND_SIGNALED complete (pyverbs defaults to 1)
            self.qp = QP(self.pd, QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self.cq, rcq=self.cq,
                                             cap=cap, sq_sig_all=0))
            attr = QPAttr()   # pyverbs 44 takes only the states as keywords
            attr.qp_access_flags = ACCESS_LOCAL_WRITE | ACCESS_REMOTE_WRITE
            attr.port_num, attr.pkey_index = self.port, 0
            self.qp.to_init(attr)
        except RdmaSetupError:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise RdmaSetupError(step, f"{self.dev}:{self.port}: {exc}") from None
        self.psn = random.getrandbits(24)
        self._odp_ok = self._device_odp()

    def _device_odp(self) -> bool:
        try:
            caps = self.ctx.query_device_ex().odp_caps
            return bool(caps.general_caps & 1 and caps.per_transport_caps.rc_odp_caps & 0x4)
        except Exception:
            return False

    def register(self, addr: int | None, length: int, remote: bool, what: str):
        """One MR (``addr`` None: pyverbs allocates the buffer).  On-demand paging when the
        device supports it, else pinned after an RLIMIT_MEMLOCK check naming the fix."""
        from pyverbs.mr import MR
        global _pinned
        access = ACCESS_LOCAL_WRITE | (ACCESS_REMOTE_WRITE if remote else 0)
        t0 = time.perf_counter()
        if self._odp_ok and addr is not None:
            try:
                mr = MR(self.pd, length, access | ACCESS_ON_DEMAND, address=addr)
                self.odp = True
                self.reg_seconds += time.perf_counter() - t0
                self.mrs.append(mr)
                return mr
            except Exception as exc:
                log.info("rdma: on-demand registration of %s refused (%s); pinning it", what, exc)
        limit = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
        problem = memlock_problem(length, _pinned, limit, has_ipc_lock())
        if problem:
            raise RdmaSetupError("register " + what, problem)
        try:
            if addr is None:
                mr = MR(self.pd, length, access)
            else:
                mr = MR(self.pd, length, access, address=addr)
        except Exception as exc:
            if getattr(exc, "error_code", 0) == 12 or "Cannot allocate memory" in str(exc):
                raise RdmaSetupError("register " + what, "refused (ENOMEM): " + memlock_message(
                    length, _pinned, limit)) from None
            raise RdmaSetupError("register " + what, str(exc)) from None
        self.reg_seconds += time.perf_counter() - t0
        with _pinned_lock:
            _pinned += length
        self.pinned += length
        self.mrs.append(mr)
        return mr

    def info(self) -> dict:
        return {"qpn": self.qp.qp_num, "psn": self.psn, "gid": self.gid, "mtu": self.mtu}

    def connect(self, remote: dict) -> None:
        """INIT -> RTR -> RTS against the peer's QP."""
        from pyverbs.addr import GID, AHAttr, GlobalRoute
        from pyverbs.qp import QPAttr
        try:
            attr = QPAttr()
            attr.qp_access_flags = ACCESS_LOCAL_WRITE | ACCESS_REMOTE_WRITE
            attr.port_num, attr.pkey_index = self.port, 0
            attr.path_mtu = min(self.mtu, remote["mtu"])
            attr.dest_qp_num = remote["qpn"]
            attr.rq_psn = remote["psn"]
            attr.max_dest_rd_atomic = 1
            attr.min_rnr_timer = 1          # 0.01 ms: a full mailbox clears quickly
            attr.ah_attr = AHAttr(gr=GlobalRoute(dgid=GID(remote["gid"]),
                                                 sgid_index=self.gid_index),
                                  is_global=1, port_num=self.port)
            self.qp.to_rtr(attr)
            attr.sq_psn = self.psn
            attr.timeout, attr.retry_cnt, attr.rnr_retry, attr.max_rd_atomic = 14, 7, 7, 1
            self.qp.to_rts(attr)
        except Exception as exc:
            raise RdmaSetupError("connect QP", str(exc)) from None

    def path_mtu_bytes(self, remote_mtu: int) -> int:
        return MTU_BYTES.get(min(self.mtu, remote_mtu), 256)

    def to_error(self) -> None:
        from pyverbs.qp import QPAttr
        try:
            self.qp.modify(QPAttr(qp_state=self.e.IBV_QPS_ERR), self.e.IBV_QP_STATE)
        except Exception:
            pass

    def wait(self, until: Callable[[], bool], on_wc: Callable[[Any], None]) -> None:
        """Reap completions (``on_wc`` each) until ``until()``; sleeps on the completion channel.

        pyverbs' ``get_cq_event`` blocks holding the GIL (every other daemon thread would stop),
        so the sleep is a ``select`` on the channel's file descriptor (which releases it), and
        ``get_cq_event`` is called only once an event is there; ``until`` is re-checked at
        least every WAIT_SLICE seconds."""
        cq, fd = self.cq, self.channel_fd
        while True:
            n, wcs = cq.poll(16)
            for wc in wcs[:n]:
                on_wc(wc)
            if until():
                return
            cq.req_notify()
            n, wcs = cq.poll(16)   # a completion that raced the arming
            for wc in wcs[:n]:
                on_wc(wc)
            if until():
                return
            if fd < 0:
                time.sleep(0.0002)
                continue
            if select.select([fd], [], [], WAIT_SLICE)[0]:
                self.channel.get_cq_event(cq)
                cq.ack_events(1)

    def close(self) -> None:
        """Release the QP, the MRs (and their share of the pinned count), then the CQ, the
        completion channel, the PD and the context; a close that fails does not stop the rest."""
        global _pinned
        _close_quietly(getattr(self, "qp", None))
        for mr in self.mrs:
            _close_quietly(mr)
        self.mrs = []
        with _pinned_lock:
            _pinned -= self.pinned
        self.pinned = 0
        for name in ("cq", "channel", "pd", "ctx"):
            _close_quietly(getattr(self, name, None))
            setattr(self, name, None)

    def describe(self) -> dict:
        return {"device": f"{self.dev}:{self.port}", "gid_index": self.gid_index,
                "registration": "odp" if self.odp else "pinned", "pinned_bytes": self.pinned,
                "register_ms": round(self.reg_seconds * 1e3, 3)}


def _close_quietly(obj) -> None:
    """Close a pyverbs object if there is one; a failure is ignored (teardown goes on)."""
    if obj is not None:
        try:
            obj.close()
        except Exception:
            pass


def _event_fds() -> set[int]:
    """This process's completion-event file descriptors (pyverbs does not expose the one a
    CompChannel owns; the daemon finds it as the one that appeared when it was created)."""
    out = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            if "infinibandevent" in os.readlink(f"/proc/self/fd/{name}"):
                out.add(int(name))
        except OSError:
            pass
    return out


def slot_view(mr, size: int) -> memoryview:
    return memoryview((ctypes.c_char * size).from_address(mr.buf)).cast("B")

