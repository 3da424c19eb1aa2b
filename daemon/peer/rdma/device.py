"""The node's RDMA device: which port and GID a mirror uses, whether RDMA is usable here at all,
and whether pinning more memory would pass RLIMIT_MEMLOCK (and, when not, how to fix it).

It reads sysfs and /proc only.  It must never open a verbs context or register memory, and it
imports pyverbs only inside ``available`` (to tell whether it is there): the daemon imports this
module on every host, RDMA or not.
"""

from __future__ import annotations

import os
import resource
from typing import Sequence

SYS_IB = "/sys/class/infiniband"
CAP_IPC_LOCK = 14
PAGE = resource.getpagesize()


class RdmaSetupError(Exception):
    """A step of bringing up an RDMA mirror failed; ``step`` names it."""

    def __init__(self, step: str, message: str):
        super().__init__(f"{step}: {message}")
        self.step = step


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
