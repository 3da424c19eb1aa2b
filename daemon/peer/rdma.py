"""RDMA transport (pyverbs): RC queue pair, one MR per ring, RDMA WRITE + WRITE_WITH_IMM.

Shape (RESEARCH.md section 4, rules 9 and 10):

* the replica registers its ring's mapping **once** (``MR(pd, len, LOCAL_WRITE|REMOTE_WRITE,
  address=<int address of the pre-faulted mmap>)``) and posts receive WRs for immediates;
* the two daemons exchange ``{qpn, psn, gid, lid, rkey, addr, len, mtu}`` over the authenticated
  TCP link (control messages ``rdma_offer`` / ``rdma_accept``) and move both RC QPs to RTS;
* ``put`` posts one RDMA WRITE per contiguous range (two SGEs at most, split at the wrap; tiny
  ranges go ``IBV_SEND_INLINE``), ``commit`` closes the batch with a zero-length
  WRITE_WITH_IMM whose immediate carries the low 32 bits of the new tail; the replica commits
  (``MirrorReplica.commit``) only after that receive completion, because RDMA placement order
  is not visible to the remote CPU until then;
* the guard head (lossy overwrite protection) cannot ride on the WRITE itself, so ``put`` sends
  it over the TCP link and waits for the replica's acknowledgement only when the guard moves
  past the last acknowledged one (once per quarter ring, amortised);
* credits come back over the TCP link exactly as with TCP.

Everything above the ``Transport`` interface (``mirror.py``) is unchanged.  No RDMA device exists
on the development and CI machines (no ``/sys/class/infiniband``), so :func:`available` returns
``(False, reason)`` there, the service logs the reason, counts ``rdma_fallbacks`` and stays on
TCP, and the RDMA conformance tests skip with that reason.
"""

from __future__ import annotations

import logging
import os
import random
import socket

from .transport import Transport, TransportClosed

log = logging.getLogger("shimmy.peer")
SYS_IB = "/sys/class/infiniband"


# -- compat shim: pyverbs enums moved in rdma-core v61 (enums.pyx removed) ------------------------
def _enums():
    try:  # rdma-core >= 61
        from pyverbs import libibverbs_enums as le

        class E:
            IBV_ACCESS_LOCAL_WRITE = le.ibv_access_flags.IBV_ACCESS_LOCAL_WRITE
            IBV_ACCESS_REMOTE_WRITE = le.ibv_access_flags.IBV_ACCESS_REMOTE_WRITE
            IBV_QPT_RC = le.ibv_qp_type.IBV_QPT_RC
            IBV_WR_RDMA_WRITE = le.ibv_wr_opcode.IBV_WR_RDMA_WRITE
            IBV_WR_RDMA_WRITE_WITH_IMM = le.ibv_wr_opcode.IBV_WR_RDMA_WRITE_WITH_IMM
            IBV_SEND_SIGNALED = le.ibv_send_flags.IBV_SEND_SIGNALED
            IBV_SEND_INLINE = le.ibv_send_flags.IBV_SEND_INLINE
            IBV_WC_SUCCESS = le.ibv_wc_status.IBV_WC_SUCCESS
            IBV_MTU_1024 = le.ibv_mtu.IBV_MTU_1024
        return E
    except ImportError:  # rdma-core <= 58 (Debian bookworm ships 44)
        import pyverbs.enums as e
        return e


def available() -> tuple[bool, str]:
    """(True, device names) when an RDMA device and pyverbs are both usable, else (False, why)."""
    try:
        devices = sorted(os.listdir(SYS_IB))
    except OSError:
        devices = []
    if not devices:
        return False, f"no RDMA device ({SYS_IB} absent or empty)"
    try:
        import pyverbs.device  # noqa: F401
        _enums()
    except ImportError as exc:
        return False, f"pyverbs not importable: {exc}"
    return True, ",".join(devices)


class RdmaEndpoint:
    """One RC QP + CQ + PD on the first device, with an MR over a ring mapping."""

    def __init__(self, ring_mm, device: str | None = None, port: int = 1, gid_index: int = 0):
        from pyverbs.cq import CQ
        from pyverbs.device import Context, get_device_list
        from pyverbs.mr import MR
        from pyverbs.pd import PD
        from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr
        import ctypes
        e = self.e = _enums()
        name = device or get_device_list()[0].name.decode()
        self.ctx = Context(name=name)
        self.port, self.gid_index = port, gid_index
        self.pd = PD(self.ctx)
        self.cq = CQ(self.ctx, 256, None, None, 0)
        cap = QPCap(max_send_wr=128, max_recv_wr=128, max_send_sge=2, max_recv_sge=1,
                    max_inline_data=64)
        self.qp = QP(self.pd, QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self.cq, rcq=self.cq, cap=cap),
                     QPAttr(port_num=port))
        # Register the whole ring mapping once (it was pre-faulted by posix_fallocate + touch).
        self._anchor = ctypes.c_char.from_buffer(ring_mm)
        self.addr = ctypes.addressof(self._anchor)
        self.length = len(ring_mm)
        self.mr = MR(self.pd, self.length, e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE,
                     address=self.addr)
        self.psn = random.getrandbits(24)

    def local_info(self) -> dict:
        gid = self.ctx.query_gid(self.port, self.gid_index)
        return {"qpn": self.qp.qp_num, "psn": self.psn, "gid": str(gid),
                "lid": self.ctx.query_port(self.port).lid, "rkey": self.mr.rkey,
                "addr": self.addr, "len": self.length}

    def connect(self, remote: dict) -> None:
        from pyverbs.addr import AHAttr, GID, GlobalRoute
        from pyverbs.qp import QPAttr
        e = self.e
        attr = QPAttr(port_num=self.port)
        attr.path_mtu = e.IBV_MTU_1024
        attr.dest_qp_num = remote["qpn"]
        attr.rq_psn = remote["psn"]
        attr.sq_psn = self.psn
        attr.max_dest_rd_atomic = attr.max_rd_atomic = 1
        attr.timeout, attr.retry_cnt, attr.rnr_retry, attr.min_rnr_timer = 14, 7, 7, 12
        gr = GlobalRoute(dgid=GID(remote["gid"]), sgid_index=self.gid_index)
        attr.ah_attr = AHAttr(port_num=self.port, is_global=1, gr=gr, dlid=remote["lid"])
        self.qp.to_rts(attr)

    def close(self) -> None:
        for obj in (self.mr, self.qp, self.cq, self.pd, self.ctx):
            try:
                obj.close()
            except Exception:
                pass
        self._anchor = None


class RdmaTransport(Transport):
    """Source end: writes ranges of the local ring into the remote replica's MR."""

    kind = "rdma"

    def __init__(self, endpoint: RdmaEndpoint, remote: dict, link, mirror_id: int,
                 ring_base: int):
        self.ep, self.remote, self.link, self.mid = endpoint, remote, link, mirror_id
        self.ring_base = ring_base       # data_offset: same on both sides (same layout)
        self._credit = None
        self._closed = False
        self._acked_guard = -1
        link.credit_handlers[mirror_id] = lambda c, t: setattr(self, "_credit", c)

    def _post(self, views, opcode, imm=None) -> None:
        from pyverbs.wr import SGE, SendWR
        e = self.ep.e
        sges = []
        for v in views:
            # views are slices of the registered mapping: their address is inside the MR
            import ctypes
            addr = ctypes.addressof(ctypes.c_char.from_buffer(v)) if not v.readonly else None
            sges.append(SGE(addr, len(v), self.ep.mr.lkey))
        wr = SendWR(opcode=opcode, num_sge=len(sges), sg=sges, send_flags=e.IBV_SEND_SIGNALED)
        if imm is not None:
            wr.imm_data = socket.htonl(imm & 0xFFFFFFFF)
        self._wr_remote_off = getattr(self, "_wr_remote_off", 0)
        wr.set_wr_rdma(self.remote["rkey"], self.remote["addr"] + self._wr_remote_off)
        self.ep.qp.post_send(wr)
        n, wcs = 0, []
        while n == 0:
            n, wcs = self.ep.cq.poll(1)
        if wcs[0].status != e.IBV_WC_SUCCESS:
            raise TransportClosed(f"RDMA completion status {wcs[0].status}")

    def put(self, start, views, guard) -> None:
        if self._closed:
            raise TransportClosed("closed")
        cap = self.remote["capacity"]
        self._wr_remote_off = self.ring_base + (start & (cap - 1))
        self._post(views[:1], self.ep.e.IBV_WR_RDMA_WRITE)
        if len(views) > 1:
            self._wr_remote_off = self.ring_base
            self._post(views[1:], self.ep.e.IBV_WR_RDMA_WRITE)

    def commit(self, tail, last, pad_until=0) -> None:
        self._wr_remote_off = 0
        self._post([], self.ep.e.IBV_WR_RDMA_WRITE_WITH_IMM, imm=tail)

    def jump(self, position, seq) -> None:
        self.link.send_ctrl({"t": "rdma_jump", "id": self.mid, "position": position,
                             "seq": seq})

    def credits(self):
        return self._credit

    def close(self) -> None:
        self._closed = True
        self.link.credit_handlers.pop(self.mid, None)
        self.ep.close()
