"""Daemon settings.  Every limit the daemon enforces is one named field here, with its default.

A config file (TOML) may set any field; command-line flags override the file.  ``docs/daemon.md``
lists the settings with their meaning.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field

from shimmy import ring
from shimmy.protocol import DEFAULT_SOCKET

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


@dataclass
class Settings:
    socket: str = DEFAULT_SOCKET          # control socket path (ZeroMQ ipc)
    shm_dir: str = "/dev/shm"             # where POSIX shm objects appear (free-space checks, sweep)
    default_capacity: int = ring.DEFAULT_CAPACITY
    max_capacity: int = ring.MAX_CAPACITY
    max_channels: int = 256
    max_subscribers: int = 64             # per channel (slots in each ring)
    max_clients: int = 1024
    shm_budget: int = 0                   # bytes of rings in total; 0 = bounded by free space only
    shm_reserve: int = 8 << 20            # keep this much of shm_dir free for others
    heartbeat_interval: float = 1.0       # clients send one heartbeat per interval
    lease_timeout: float = 5.0            # no heartbeat for this long: subscriber slots evicted
    idle_channel_ttl: float = 300.0       # a channel nobody holds for this long is deleted
    request_max_bytes: int = 65536        # larger control messages are refused unread
    access: str = "open"                  # "open" or "closed" when a client has no policy labels
    log_level: str = "info"
    node: str = ""                        # node name (peering); empty = hostname
    # -- peering (daemon/peer, docs/peering.md) --
    peer_listen: str = ""                 # HOST:PORT to accept peer daemons on; empty = none
    peers: list = field(default_factory=list)   # HOST:PORT of peers this daemon dials
    peer_dns: str = ""                    # NAME:PORT resolved to all peers (Kubernetes headless
                                          # Service); re-resolved every peer_dns_interval
    peer_dns_interval: float = 10.0
    cluster_key_file: str = ""            # shared secret for peer authentication (required)
    peer_tls_cert: str = ""               # PEM cert+key enable TLS on peer links (both sides)
    peer_tls_key: str = ""
    peer_tls_ca: str = ""                 # CA bundle to verify the other side's certificate
    peer_backoff_initial: float = 0.05    # first reconnect delay, doubled per failure ...
    peer_backoff_max: float = 2.0         # ... up to this cap
    peer_handshake_timeout: float = 5.0   # a peer must finish authenticating within this
    peer_link_timeout: float = 10.0       # silence (no data, no keepalive) for this long: dead
    peer_keepalive: float = 1.0           # keepalive period on idle links
    peer_max_pending: int = 16            # unauthenticated connections handled at once
    peer_max_links: int = 64              # authenticated links at once
    peer_max_control_bytes: int = 1 << 20  # largest control message a peer may send
    peer_max_replica_capacity: int = 1 << 28  # largest ring a peer may make us replicate
    peer_max_replicas: int = 128          # replica rings this node keeps at once
    peer_hold: float = 10.0               # reliable: keep a disconnected mirror's data this long
    peer_credit_interval: float = 0.0002  # replica reports consumed positions this often (busy)
    peer_unmirror_grace: float = 1.0      # mirror stops this long after its last subscriber left
    # -- RDMA transport (daemon/peer/rdma.py, docs/rdma.md) --
    transport: str = field(default="auto", metadata={
        "help": "peer data path: tcp, rdma (startup error without a usable RDMA device) or auto "
                "(RDMA when both peers have a device and agree, else TCP; fallbacks are logged "
                "and counted)"})
    rdma_device: str = field(default="", metadata={
        "help": "RDMA device or device:port for mirrors (empty: the first active port)"})
    rdma_small_write_threshold: int = field(default=512, metadata={
        "help": "committed ranges shorter than this many bytes are copied through the "
                "replica's mailbox (CPU path) instead of placed by RDMA WRITE; at most "
                "RDMA_MAX_SMALL_WRITE, capped per mirror by the path MTU"})

    def validate(self) -> "Settings":
        ring.check_capacity(self.default_capacity)
        ring.check_capacity(self.max_capacity)
        if self.default_capacity > self.max_capacity:
            raise ValueError("default_capacity must not exceed max_capacity")
        if not 1 <= self.max_subscribers <= ring.MAX_SUBSCRIBERS_LIMIT:
            raise ValueError(f"max_subscribers must be 1..{ring.MAX_SUBSCRIBERS_LIMIT}")
        for name in ("max_channels", "max_clients", "request_max_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not 0 < self.heartbeat_interval < self.lease_timeout:
            raise ValueError("need 0 < heartbeat_interval < lease_timeout")
        if self.access not in ("open", "closed"):
            raise ValueError("access must be 'open' or 'closed'")
        if (self.peer_listen or self.peers or self.peer_dns) and not self.cluster_key_file:
            raise ValueError("peering (peer_listen/peers) needs cluster_key_file: peers are "
                             "authenticated with a shared key")
        if not 0 < self.peer_backoff_initial <= self.peer_backoff_max:
            raise ValueError("need 0 < peer_backoff_initial <= peer_backoff_max")
        if self.peer_max_replica_capacity > ring.MAX_CAPACITY:
            raise ValueError(f"peer_max_replica_capacity must be <= {ring.MAX_CAPACITY}")
        self._validate_rdma()
        return self

    def _validate_rdma(self) -> None:
        if self.transport not in ("tcp", "rdma", "auto"):
            raise ValueError(f"transport={self.transport!r}: must be tcp, rdma or auto")
        if not 0 <= self.rdma_small_write_threshold <= RDMA_MAX_SMALL_WRITE:
            raise ValueError(f"rdma_small_write_threshold={self.rdma_small_write_threshold}: "
                             f"must be 0..{RDMA_MAX_SMALL_WRITE} bytes")
        if self.transport == "rdma":
            from shimmy.daemon.peer import rdma
            ok, why = rdma.available(self.rdma_device)
            if not ok:
                raise ValueError(f"transport=rdma but RDMA is not usable here: {why}; use "
                                 f"transport=auto (falls back to TCP) or transport=tcp")


RDMA_MAX_SMALL_WRITE = 4032   # mailbox slot payload at the largest path MTU (4096 - 64 header)


def load(path: str | None, **overrides) -> Settings:
    values: dict = {}
    if path:
        with open(path, "rb") as fh:
            values = tomllib.load(fh)
        known = {f.name for f in dataclasses.fields(Settings)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"{path}: unknown settings {sorted(unknown)}; known: {sorted(known)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values).validate()
