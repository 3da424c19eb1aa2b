"""RDMA transport (pyverbs): one RC queue pair per mirror, RDMA WRITE into the replica ring.

Shape (docs/rdma.md has the deployment side and the steps in prose):

* The replica registers its ring's shared-memory mapping once per mirror as a memory region
  with remote-write access (the same pages its local subscribers read), plus a small *mailbox*
  region of ``SLOTS`` records, and posts one receive work request per mailbox slot.  It offers
  ``{qpn, psn, gid, ring addr/rkey, mailbox addr/rkey, ...}`` in its ``mirror`` request over the
  authenticated peer link; the source registers its own ring (local access), brings its QP to
  RTS and answers ``{"t": "rdma", "k": "accept"}``; the replica brings its QP to RTS and answers
  ``ready``.  Any failure on the way: TCP, logged and counted (``rdma_fallbacks``).
* Data: each contiguous committed range is one RDMA WRITE from the source ring straight into the
  replica ring at the same offsets (two WRITEs when it wraps), unsignalled; the batch is closed
  by one signalled WRITE_WITH_IMM of a 64-byte record ``COMMIT(tail, last, pad_until)`` into
  mailbox slot ``seq % SLOTS`` (immediate = ``seq``).  Work requests of one batch go in one
  chained ``post_send``.  The replica's CPU sees nothing until the receive completion of that
  record; only then does it commit (store last, tail, fence, wake) via ``MirrorReplica``.
* Small ranges (below ``rdma_small_write_threshold``) take the CPU path: the source copies them
  into its staging slot and one WRITE_WITH_IMM carries record + bytes into the mailbox; the
  replica copies them into the ring (``put_target`` + ``commit``, as over TCP).
* Jumps travel as records too, so every replica-side change arrives in one ordered stream.
* Lossy guard: before a WRITE may land on ring offsets the replica's readers could still be
  reading, the source sends ``GUARD(need, ahead)``; the replica stores a head >= need (up to a
  quarter ring ahead, so this costs one round trip per quarter ring) and acknowledges over the
  link.  No byte is written below the acknowledged head + capacity.
* Lossy mode also waits for the completion of the batch's last WRITE before ``put`` returns:
  only then has the adapter read the source bytes, so the mirror's seqlock check after ``put``
  still proves they were intact.  Reliable mode does not wait (the mirror's slot holds them).
* Flow control on the mailbox: the replica reposts a slot's receive only after it has processed
  that record, and records are single packets (slot size <= path MTU), so a source that runs
  ahead gets receiver-not-ready NAKs (retried without limit) instead of overwriting a record;
  every record also carries its sequence number, checked by the replica.
* Errors: a failed completion, a QP that left RTS or a violated record tears the mirror down with
  a log line naming the step and the reason; the replica asks for the mirror again (a new QP, or
  TCP after ``RDMA_RETRIES`` failures) and resumes from its committed tail, so reliable mode loses
  nothing.

pyverbs is imported only inside functions: the module imports (and its pure helpers run) where
pyverbs does not exist.
"""

from __future__ import annotations

import ctypes
import logging
import os
import random
import resource
import select
import struct
import threading
import time
from typing import Any, Callable, Sequence

from .transport import Transport, TransportClosed

log = logging.getLogger("shimmy.peer")
SYS_IB = "/sys/class/infiniband"

REC = struct.Struct("<IIQQQQQ")     # op, seq, a, b, c, d, e
REC_AREA = 64                       # record header area of a mailbox slot; payload follows
SLOTS = 64                          # mailbox records in flight per mirror
OP_COMMIT, OP_PUT_COMMIT, OP_JUMP, OP_GUARD = 1, 2, 3, 4
RDMA_RETRIES = 2                    # QP failures of one replica before it stays on TCP
FAULT_ENV = "SHIMMY_RDMA_FAULT_AFTER"  # lab fault injection: QP to error after N batches
ACCESS_LOCAL_WRITE, ACCESS_REMOTE_WRITE, ACCESS_ON_DEMAND = 1, 2, 64
CAP_IPC_LOCK = 14
PAGE = resource.getpagesize()
WAIT_SLICE = 0.2                    # longest sleep on a completion channel before re-checking
MTU_BYTES = {1: 256, 2: 512, 3: 1024, 4: 2048, 5: 4096}

WC_STATUS = {
    1: "local length error", 2: "local QP operation error", 4: "local protection error",
    5: "work request flushed (QP in error state)", 7: "bad response", 8: "local access error",
    9: "remote invalid request", 10: "remote access error", 11: "remote operation error",
    12: "transport retry counter exceeded", 13: "RNR retry counter exceeded",
    16: "remote aborted", 19: "fatal error", 20: "response timeout", 21: "general error",
}


class RdmaSetupError(Exception):
    """A step of bringing up an RDMA mirror failed; ``step`` names it."""

    def __init__(self, step: str, message: str):
        super().__init__(f"{step}: {message}")
        self.step = step


# -- pure helpers (unit-tested on hosts without a device) ----------------------------------------
def wc_error(status: int, step: str) -> str:
    """A completion status as a log/error phrase naming the step."""
    return f"{step}: completion status {status} ({WC_STATUS.get(status, 'unknown status')})"


def split_range(start: int, n: int, capacity: int) -> list[tuple[int, int]]:
    """Ring (offset, length) pieces of stream range [start, start + n): split only at the wrap."""
    off = start & (capacity - 1)
    if off + n <= capacity:
        return [(off, n)]
    return [(off, capacity - off), (0, n - (capacity - off))]


def uses_cpu_path(n: int, threshold: int) -> bool:
    """Ranges shorter than the threshold are copied through the mailbox instead of placed."""
    return n < threshold


def guard_request(start: int, end: int, capacity: int, acked: int,
                  credit: int | None, reliable: bool) -> tuple[int, int] | None:
    """(need, ahead) when a WRITE of [start, end) needs the replica's head moved first, else None.

    ``need`` is the lowest head that keeps every byte the WRITE overwrites out of the readers'
    range; ``ahead`` asks for up to a quarter ring more (fewer round trips), never past the
    replica's tail (``start``) nor, in reliable mode, past what its subscribers consumed."""
    need = end - capacity
    if need <= acked:
        return None
    ahead = min(start, need + capacity // 4)
    if reliable:
        ahead = min(ahead, credit if credit is not None else need)
    return need, max(need, ahead)


def pick_gid(entries: Sequence[tuple[int, str, str]]) -> int:
    """Index of the RoCE v2 GID to use from (index, gid, type) rows: by type, IPv4-mapped first
    (it routes over plain IPv4), then any other non-zero v2 GID; -1 when there is none."""
    v2 = [(i, g) for i, g, t in entries if t.strip().lower() == "roce v2" and g.strip("0:")]
    for i, g in v2:
        if g.startswith("0000:0000:0000:0000:0000:ffff:"):
            return i
    return v2[0][0] if v2 else -1


def memlock_message(nbytes: int, pinned: int, limit: int) -> str:
    return (f"pinning {nbytes} bytes (+{pinned} already pinned) exceeds RLIMIT_MEMLOCK="
            f"{limit} bytes; raise the memlock limit (ulimit -l unlimited, docker --ulimit "
            f"memlock=-1, systemd LimitMEMLOCK=infinity) or grant CAP_IPC_LOCK")


def memlock_problem(nbytes: int, pinned: int, limit: int, ipc_lock: bool) -> str | None:
    """Why pinning ``nbytes`` more (``pinned`` already) would fail, or None when it fits.
    The kernel counts whole pages, and an unaligned range touches one more."""
    if ipc_lock or limit == resource.RLIM_INFINITY:
        return None
    span = ((nbytes + PAGE - 1) // PAGE + 1) * PAGE
    return None if pinned + span <= limit else memlock_message(nbytes, pinned, limit)


OFFER_FIELDS = {"qpn": int, "psn": int, "gid": str, "mtu": int, "ring_addr": int,
                "ring_rkey": int, "ring_len": int, "box_addr": int, "box_rkey": int,
                "slots": int, "slot_size": int, "head": int}
ACCEPT_FIELDS = {"qpn": int, "psn": int, "gid": str, "mtu": int}


def check_fields(obj: Any, fields: dict[str, type], what: str) -> dict:
    """Validate a handshake map from the peer: every field present with its type, ints >= 0."""
    if not isinstance(obj, dict):
        raise ValueError(f"{what} is not a map")
    out: dict[str, Any] = {}
    for name, kind in fields.items():
        v = obj.get(name)
        negative = isinstance(v, int) and v < 0
        if not isinstance(v, kind) or isinstance(v, bool) or negative:
            raise ValueError(f"{what}: field {name!r} missing or not a non-negative "
                             f"{kind.__name__}")
        out[name] = v
    if what == "rdma offer":
        if out["slots"] < 2 or out["slot_size"] < REC_AREA or out["slot_size"] % 64:
            raise ValueError("rdma offer: mailbox slots/slot_size out of range")
    return out


def choose(setting: str, local_ok: bool, remote_offered: bool) -> tuple[str, str]:
    """Transport for a new mirror and why: 'rdma' only when both sides can and agree."""
    if setting == "tcp":
        return "tcp", "transport=tcp"
    if not local_ok:
        return "tcp", "no usable local RDMA device"
    if not remote_offered:
        return "tcp", "the peer offered no RDMA (transport=tcp there, no device, or setup failed)"
    return "rdma", ""


def has_ipc_lock() -> bool:
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_IPC_LOCK & 1)
    except OSError:
        pass
    return False


def _read(path: str) -> str:
    try:
        with open(path) as fh:
            return fh.read().strip()
    except OSError:
        return ""


def list_ports() -> list[tuple[str, int, bool]]:
    """(device, port, active) for every RDMA port in sysfs."""
    out: list[tuple[str, int, bool]] = []
    try:
        devices = sorted(os.listdir(SYS_IB))
    except OSError:
        return out
    for dev in devices:
        try:
            ports = sorted(int(p) for p in os.listdir(f"{SYS_IB}/{dev}/ports"))
        except (OSError, ValueError):
            continue
        for p in ports:
            out.append((dev, p, _read(f"{SYS_IB}/{dev}/ports/{p}/state").endswith("ACTIVE")))
    return out


def select_port(wanted: str) -> tuple[str, int]:
    """``rdma_device`` ('' = first active port, 'dev' or 'dev:port') -> (device, port)."""
    ports = list_ports()
    if not ports:
        raise RdmaSetupError("device", f"no RDMA device ({SYS_IB} absent or empty)")
    name, _, port = wanted.partition(":")
    for dev, p, active in ports:
        if (not name or dev == name) and (not port or str(p) == port):
            if active:
                return dev, p
    if name:
        raise RdmaSetupError("device", f"rdma_device={wanted!r}: no such active port (have "
                                       f"{', '.join(f'{d}:{p}' for d, p, _ in ports)})")
    raise RdmaSetupError("device", "no active RDMA port")


def gid_index(dev: str, port: int) -> int:
    base = f"{SYS_IB}/{dev}/ports/{port}"
    if _read(f"{base}/link_layer") == "InfiniBand":
        return 0
    rows = []
    try:
        names = os.listdir(f"{base}/gids")
    except OSError:
        names = []
    for name in names:
        if name.isdigit():
            rows.append((int(name), _read(f"{base}/gids/{name}"),
                         _read(f"{base}/gid_attrs/types/{name}")))
    i = pick_gid(sorted(rows))
    if i < 0:
        raise RdmaSetupError("gid", f"{dev}:{port} has no RoCE v2 GID (is an IP address set on "
                                    "its network interface?)")
    return i


def available(wanted: str = "") -> tuple[bool, str]:
    """(True, 'dev:port') when an active port and pyverbs are both usable, else (False, why)."""
    try:
        dev, port = select_port(wanted)
    except RdmaSetupError as exc:
        return False, str(exc)
    try:
        import pyverbs.device  # noqa: F401
    except ImportError as exc:
        return False, f"pyverbs not importable: {exc}"
    return True, f"{dev}:{port}"


def mapping_address(mm) -> int:
    """Address of a writable mmap's first byte (the export is released at once)."""
    anchor = ctypes.c_char.from_buffer(mm)
    addr = ctypes.addressof(anchor)
    del anchor
    return addr


_pinned_lock = threading.Lock()
_pinned = 0                         # bytes this process has registered pinned, all mirrors


# -- verbs objects --------------------------------------------------------------------------------
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
        global _pinned
        for name in ("qp",):
            obj = getattr(self, name, None)
            if obj is not None:
                try:
                    obj.close()
                except Exception:
                    pass
        for mr in self.mrs:
            try:
                mr.close()
            except Exception:
                pass
        self.mrs = []
        with _pinned_lock:
            _pinned -= self.pinned
        self.pinned = 0
        for name in ("cq", "channel", "pd", "ctx"):
            obj = getattr(self, name, None)
            if obj is not None:
                try:
                    obj.close()
                except Exception:
                    pass
            setattr(self, name, None)

    def describe(self) -> dict:
        return {"device": f"{self.dev}:{self.port}", "gid_index": self.gid_index,
                "registration": "odp" if self.odp else "pinned", "pinned_bytes": self.pinned,
                "register_ms": round(self.reg_seconds * 1e3, 3)}


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


def _slot_view(mr, size: int) -> memoryview:
    return memoryview((ctypes.c_char * size).from_address(mr.buf)).cast("B")


# -- replica side ---------------------------------------------------------------------------------
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
            self.box = _slot_view(self.box_mr, SLOTS * self.slot_size)
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


# -- source side ----------------------------------------------------------------------------------
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
            self.stage = _slot_view(self.stage_mr, self.slots * self.slot_size)
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
