"""Who is on the other end of the daemon's unix sockets: pid, uid, groups and container.

The identity chain (see ``docs/containers.md``):

1. **Peer credentials.**  The kernel tells the daemon the pid, uid and gid of the process that
   connected to its unix socket (``SO_PEERCRED``, :func:`peer_credentials`).  The pid is
   translated into the daemon's pid namespace, so the daemon must share the host's (compose
   ``pid: host``, Kubernetes ``hostPID``) for the pid to mean anything; a peer in a pid namespace
   the daemon cannot see arrives as pid 0.
2. **Groups.**  ``/proc/<pid>/status`` lists the process's supplementary groups
   (:func:`supplementary_groups`).
3. **cgroup.**  ``/proc/<pid>/cgroup`` names the container the process runs in
   (:func:`container_id_of_pid`).

The container's labels come from the engine (:mod:`.containers`); what they allow is decided in
:mod:`.label_policy`, and ownership and the uid/group rules in :mod:`.access`.  This module only
observes: it reads the kernel's answers and ``/proc``, keeps no state, and never decides.
"""

from __future__ import annotations

import os
import re
import socket
import struct
from dataclasses import dataclass


# --------------------------------------------------------------------------------------------
# 1. peer credentials
# --------------------------------------------------------------------------------------------

_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the peer of a connected ``AF_UNIX`` socket (Linux ``SO_PEERCRED``).

    The pid is in the daemon's pid namespace; 0 means the peer lives in a pid namespace the
    daemon cannot see (run the daemon with the host's pid namespace to identify containers).
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def supplementary_groups(pid: int | None, proc_root: str = "/proc") -> frozenset[int]:
    """The supplementary groups of process ``pid`` (``Groups:`` in ``/proc/<pid>/status``);
    empty when the pid is unknown or its status cannot be read (other pid namespace)."""
    if not isinstance(pid, int) or pid <= 0:
        return frozenset()
    try:
        with open(os.path.join(proc_root, str(pid), "status"), encoding="ascii",
                  errors="replace") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:] if g.isdigit())
    except OSError:
        pass
    return frozenset()


# --------------------------------------------------------------------------------------------
# 2. /proc/<pid>/cgroup -> container id
# --------------------------------------------------------------------------------------------

_HEX64 = r"([0-9a-f]{64})"
# Each pattern is searched in the cgroup *path* of every line of /proc/<pid>/cgroup.  The path
# may start with "/.." segments when the reader is in another cgroup namespace, and may nest
# (docker in docker): the last match in a path is the innermost container, the one the process
# actually runs in.
_CONTAINER_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(r"/docker/" + _HEX64 + r"(?=/|$)"),                 # docker, cgroupfs driver
    re.compile(r"docker-" + _HEX64 + r"\.scope"),                  # docker, systemd driver
    re.compile(r"cri-containerd-" + _HEX64 + r"\.scope"),          # containerd CRI, systemd
    re.compile(r"crio-(?:conmon-)?" + _HEX64 + r"(?:\.scope)?(?=/|$)"),  # CRI-O
    re.compile(r"libpod-(?:conmon-)?" + _HEX64 + r"(?:\.scope)?(?=/|$)"),  # podman
    # Kubernetes with the cgroupfs driver: /kubepods[/<qos>]/pod<uid>/<id>
    re.compile(r"/kubepods(?:/[a-z]+)?/pod[0-9a-f_-]+/" + _HEX64 + r"(?=/|$)"),
)


def container_id_from_cgroup(text: str) -> str | None:
    """The container id named in the contents of a ``/proc/<pid>/cgroup`` file, or ``None``.

    Understands cgroup v1 (``N:controllers:path`` lines) and v2 (``0::path``), the docker
    cgroupfs (``/docker/<id>``) and systemd (``docker-<id>.scope``) layouts, containerd
    (``cri-containerd-<id>.scope``), CRI-O (``crio-<id>``), podman (``libpod-<id>``) and
    kubepods cgroupfs paths.  ``..`` segments (a reader in another cgroup namespace) are fine.
    """
    best: tuple[int, str] | None = None  # (position in path, id): prefer the innermost
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        path = parts[2].strip()
        for pattern in _CONTAINER_PATTERNS:
            for match in pattern.finditer(path):
                candidate = (match.start(1), match.group(1))
                if best is None or candidate[0] > best[0]:
                    best = candidate
        if best is not None:
            # every hierarchy of one process names the same container; the first line that
            # names one is enough (the loop still picks the innermost within that line)
            return best[1]
    return None


def container_id_of_pid(pid: int, proc_root: str = "/proc") -> str | None:
    """The id (64 hex digits) of the container process ``pid`` runs in, or ``None``.

    ``None`` means: not in a container, the process is gone, or ``/proc/<pid>/cgroup`` cannot be
    read (another pid namespace, ``hidepid``).  Never raises for a missing or unreadable file.
    """
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        with open(os.path.join(proc_root, str(pid), "cgroup"), encoding="utf-8",
                  errors="replace") as f:
            text = f.read(1 << 16)
    except OSError:
        return None
    return container_id_from_cgroup(text)


@dataclass(frozen=True)
class Caller:
    """Who a request comes from, as far as the daemon knows it."""

    uid: int
    gid: int
    groups: frozenset[int] = frozenset()
    pid: int | None = None
    container: str | None = None
    labels: tuple[tuple[str, str], ...] = ()

    def in_group(self, gid: int) -> bool:
        return gid == self.gid or gid in self.groups

    def describe(self) -> str:
        where = f" in container {self.container[:12]}" if self.container else ""
        return f"uid {self.uid} (pid {self.pid}{where})"
