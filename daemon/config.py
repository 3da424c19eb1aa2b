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
    socket: str = field(default=DEFAULT_SOCKET,
        metadata={"help": "control socket path (ZeroMQ ipc); clients find it via $SHIMMY_DAEMON"})
    shm_dir: str = field(default="/dev/shm",
        metadata={"help": "where POSIX shared-memory objects appear (free-space checks, sweep)"})
    default_capacity: int = field(default=ring.DEFAULT_CAPACITY,
        metadata={"help": "ring size in bytes for a channel created without one (power of two)"})
    max_capacity: int = field(default=ring.MAX_CAPACITY,
        metadata={"help": "largest ring a client may ask for, in bytes (power of two)"})
    max_channels: int = field(default=256,
        metadata={"help": "channels and streams this daemon holds at once"})
    max_subscribers: int = field(default=64,
        metadata={"help": "subscriber slots in each ring (per channel)"})
    max_clients: int = field(default=1024,
        metadata={"help": "client sessions connected at once"})
    shm_budget: int = field(default=0,
        metadata={"help": "bytes of rings in total; 0 = bounded by free space only"})
    shm_reserve: int = field(default=8 << 20,
        metadata={"help": "bytes of shm_dir always left free for others"})
    heartbeat_interval: float = field(default=1.0,
        metadata={"help": "seconds between client heartbeats"})
    lease_timeout: float = field(default=5.0,
        metadata={"help": "seconds without a heartbeat before a client's subscriber "
                            "slots are evicted"})
    idle_channel_ttl: float = field(default=300.0,
        metadata={"help": "seconds a channel nobody holds is kept before it is deleted"})
    request_max_bytes: int = field(default=65536,
        metadata={"help": "larger control messages are refused unread"})
    access: str = field(default="open",
        metadata={"help": "policy for clients with no policy labels: open or closed"})
    log_level: str = field(default="info",
        metadata={"help": "debug, info, warning or error"})
    node: str = field(default="",
        metadata={"help": "this node's name among peers; empty = hostname"})
    # -- peering (daemon/peer, docs/peering.md) --
    peer_listen: str = field(default="",
        metadata={"help": "HOST:PORT to accept peer daemons on; empty = none"})
    peers: list = field(default_factory=list,
        metadata={"help": "HOST:PORT of a peer daemon to dial (repeatable)"})
    peer_dns: str = field(default="",
        metadata={"help": "NAME:PORT resolved to all peers (a Kubernetes headless "
                            "Service), re-resolved every peer_dns_interval"})
    peer_dns_interval: float = field(default=10.0,
        metadata={"help": "seconds between re-resolutions of peer_dns"})
    cluster_key_file: str = field(default="",
        metadata={"help": "file holding the shared secret that authenticates peer "
                            "daemons (required for peering)"})
    peer_tls_cert: str = field(default="",
        metadata={"help": "PEM certificate: enables TLS on peer links (with peer_tls_key)"})
    peer_tls_key: str = field(default="",
        metadata={"help": "PEM private key for peer_tls_cert"})
    peer_tls_ca: str = field(default="",
        metadata={"help": "CA bundle verifying the other daemon's certificate"})
    peer_backoff_initial: float = field(default=0.05,
        metadata={"help": "first reconnect delay in seconds, doubled per failure"})
    peer_backoff_max: float = field(default=2.0,
        metadata={"help": "cap on the reconnect delay in seconds"})
    peer_handshake_timeout: float = field(default=5.0,
        metadata={"help": "seconds a peer has to finish authenticating"})
    peer_link_timeout: float = field(default=10.0,
        metadata={"help": "seconds of silence (no data, no keepalive) before a link is dead"})
    peer_keepalive: float = field(default=1.0,
        metadata={"help": "keepalive period in seconds on idle links"})
    peer_max_pending: int = field(default=16,
        metadata={"help": "unauthenticated peer connections handled at once"})
    peer_max_links: int = field(default=64,
        metadata={"help": "authenticated peer links at once"})
    peer_max_control_bytes: int = field(default=1 << 20,
        metadata={"help": "largest control message a peer may send, in bytes"})
    peer_max_replica_capacity: int = field(default=1 << 28,
        metadata={"help": "largest ring a peer may make this node replicate, in bytes"})
    peer_max_replicas: int = field(default=128,
        metadata={"help": "replica rings this node keeps at once"})
    peer_hold: float = field(default=10.0,
        metadata={"help": "reliable mode: seconds a disconnected mirror's data is kept"})
    peer_credit_interval: float = field(default=0.0002,
        metadata={"help": "seconds between a replica's consumed-position reports (while busy)"})
    peer_unmirror_grace: float = field(default=1.0,
        metadata={"help": "seconds a mirror keeps running after its last subscriber left"})

    # -- observability (daemon/metrics.py, daemon/logformat.py, docs/metrics.md) --
    metrics_listen: str = field(default="", metadata={
        "help": "HOST:PORT serving Prometheus metrics at /metrics (e.g. 127.0.0.1:9464); "
                "empty = no metrics endpoint"})
    log_format: str = field(default="text", metadata={
        "help": "log line format: 'text' (human) or 'json' (one JSON object per line, for log "
                "shippers)"})

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
        # -- observability --
        if self.metrics_listen:
            from .metrics import parse_listen
            parse_listen(self.metrics_listen)
        if self.log_format not in ("text", "json"):
            raise ValueError(f"log_format must be 'text' or 'json', got {self.log_format!r}")
        return self


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
