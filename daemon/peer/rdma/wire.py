"""What the two ends of an RDMA mirror say to each other, and the pure rules both ends apply.

The mailbox records (``REC``: op, seq and five words, in a ``REC_AREA`` header, a small range's
bytes after it), the handshake maps (``OFFER_FIELDS`` from the replica in its ``mirror``
request, ``ACCEPT_FIELDS`` from the source) and how they are checked, which transport a mirror
takes (``choose``), where a range lands in the ring (``split_range``), which ranges take the CPU
path (``uses_cpu_path``), when the lossy guard is needed (``guard_request``) and how a failed
completion is named (``wc_error``).  The package docstring tells the protocol in order.

Pure: it must never touch a device, a queue pair or memory registration, nor import pyverbs;
every function here runs (and is unit-tested) on a host without RDMA.
"""

from __future__ import annotations

import struct
from typing import Any

REC = struct.Struct("<IIQQQQQ")     # op, seq, a, b, c, d, e
REC_AREA = 64                       # record header area of a mailbox slot; payload follows
SLOTS = 64                          # mailbox records in flight per mirror
OP_COMMIT, OP_PUT_COMMIT, OP_JUMP, OP_GUARD = 1, 2, 3, 4
RDMA_RETRIES = 2                    # QP failures of one replica before it stays on TCP

WC_STATUS = {
    1: "local length error", 2: "local QP operation error", 4: "local protection error",
    5: "work request flushed (QP in error state)", 7: "bad response", 8: "local access error",
    9: "remote invalid request", 10: "remote access error", 11: "remote operation error",
    12: "transport retry counter exceeded", 13: "RNR retry counter exceeded",
    16: "remote aborted", 19: "fatal error", 20: "response timeout", 21: "general error",
}



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

