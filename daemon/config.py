"""Daemon settings.  Every limit the daemon enforces is one named field here, with its default and
its help text (``metadata["help"]``, from which the CLI builds one ``--field-name`` flag per field).

A config file (TOML) may set any field; command-line flags override the file.  :meth:`validate`
checks every value at start (type, range, paths that must exist and be writable), so a bad
setting is a startup error naming the setting, never a failure at the first request.
``docs/daemon.md`` lists the settings with their meaning.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field

from shimmy import ring
from shimmy.protocol import DEFAULT_SOCKET

from .rules import parse_rule
from .setting_values import SettingError, parse_listen, parse_mode, resolve_group

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib


def _s(default, help: str, **kw):
    """A setting: its default and its help text (the CLI and docs read ``metadata["help"]``)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


ACCESS_POLICIES = ("owner", "closed", "open")


# Every setting below is one declaration: name, type, default and help, the one place the CLI's
# flags and the docs read them from.  Their lines look alike (a checker for repeated code lists
# them) because each says the same kind of thing about a different limit; a table built in a
# loop would hide the fields from the type checker and from a reader looking one up.
@dataclass
class Settings:
    socket: str = _s(DEFAULT_SOCKET, "control socket path (a unix stream socket, control "
                                     "protocol v2); its directory must exist or be creatable")
    shm_dir: str = _s("/dev/shm", "where POSIX shm objects appear (free-space checks, sweep); "
                                  "must exist and be writable")
    default_capacity: int = _s(ring.DEFAULT_CAPACITY, "ring size when a client does not ask "
                                                      "(power of two)")
    max_capacity: int = _s(ring.MAX_CAPACITY, "largest ring a client may ask for")
    max_channels: int = _s(16384, "channels (and, counted apart, streams) at once, all clients")
    max_subscribers: int = _s(64, "subscriber slots in each ring")
    default_max_publishers: int = _s(1, "publishers a channel admits at once when its creator "
                                        "does not say (1 = exclusive: a second gets PublisherBusy)")
    max_publishers: int = _s(64, "largest max_publishers a client may create a channel with "
                                 f"(at most {ring.MAX_PUBLISHERS_LIMIT})")
    max_clients: int = _s(4096, "client sessions (hello) at once, all clients")
    shm_budget: int = _s(0, "bytes of rings in total; 0 = bounded by free space only")
    shm_reserve: int = _s(8 << 20, "bytes of shm_dir kept free for others")
    heartbeat_interval: float = _s(1.0, "clients send one heartbeat per interval (seconds)")
    lease_timeout: float = _s(5.0, "no heartbeat for this long: the client's subscriber slots "
                                   "are evicted (seconds)")
    idle_channel_ttl: float = _s(60.0, "a channel with no ends attached (no client holds it, no "
                                       "publisher, subscriber or mirror) and nothing unread is "
                                       "deleted after this long (s); 0 = kept until deleted")
    idle_channel_unread_ttl: float = _s(3600.0, "a channel with no ends attached whose ring "
                                                "still holds unread messages is deleted after "
                                                "this long (s; logged and counted, shown in ls "
                                                "and stat meanwhile); 0 = kept until deleted")
    stream_orphan_timeout: float = _s(300.0, "a stream whose writer has finished and that no "
                                      "reader has opened for this long is freed (s); 0 = keep "
                                      "it for its reader until the daemon stops")
    request_max_bytes: int = _s(65536, "larger control request frames are refused unread (an "
                                       "error reply, then the connection is closed)")
    control_request_timeout: float = _s(5.0, "a control connection that sends nothing this long "
                                             "after connecting, or leaves a request unfinished "
                                             "this long, is closed (seconds)")
    access: str = _s("owner", "access policy: 'owner' (a channel belongs to the uid that created "
                              "it; others need a channel_rules entry or channel_group), 'closed' "
                              "(as owner, and unlabelled containers get nothing), 'open' (any "
                              "local user may read, write and delete every channel: single-tenant "
                              "hosts only)", choices=ACCESS_POLICIES)
    log_level: str = _s("info", "debug, info, warning or error",
                        choices=("debug", "info", "warning", "error"))
    node: str = _s("", "node name (peering); empty = hostname")
    # -- peering (daemon/peer, docs/peering.md) --
    peer_listen: str = _s("", "HOST:PORT to accept peer daemons on; empty = none")
    peers: list = _s([], "HOST:PORT of peers this daemon dials")
    peer_dns: str = _s("", "NAME:PORT resolved to all peers (Kubernetes headless Service); "
                           "re-resolved every peer_dns_interval")
    peer_dns_interval: float = _s(10.0, "seconds between peer_dns resolutions")
    cluster_key_file: str = _s("", "shared secret for peer authentication (required to peer)")
    peer_tls_cert: str = _s("", "PEM cert+key enable TLS on peer links (both sides)")
    peer_tls_key: str = _s("", "PEM private key for peer_tls_cert")
    peer_tls_ca: str = _s("", "CA bundle to verify the other side's certificate")
    peer_backoff_initial: float = _s(0.05, "first reconnect delay, doubled per failure ...")
    peer_backoff_max: float = _s(2.0, "... up to this cap")
    peer_handshake_timeout: float = _s(5.0, "a peer must finish authenticating within this")
    peer_link_timeout: float = _s(10.0, "silence (no data, no keepalive) for this long: dead")
    peer_keepalive: float = _s(1.0, "keepalive period on idle links")
    peer_max_pending: int = _s(16, "unauthenticated peer connections handled at once")
    peer_max_links: int = _s(256, "authenticated peer links at once")
    peer_max_control_bytes: int = _s(1 << 20, "largest control message a peer may send")
    peer_max_replica_capacity: int = _s(1 << 28, "largest ring a peer may make us replicate")
    peer_max_replicas: int = _s(4096, "replica rings this node keeps at once")
    peer_hold: float = _s(10.0, "reliable: keep a disconnected mirror's data this long")
    peer_credit_interval: float = _s(0.0002, "while the source may wait for room, the "
                                       "replica's credit thread looks for a credit due this often "
                                       "(credits otherwise leave from the commit path)")
    peer_unmirror_grace: float = _s(1.0, "mirror stops this long after its last subscriber left")
    # -- peering: cluster-wide names and restarts (daemon/peer, docs/peering.md) --
    peer_forget_after: float = _s(60.0, "seconds a peer node may stay without a link before it is "
                                        "forgotten: its announced channels leave `ls` and its "
                                        "replicas here become local channels")
    peer_drain_timeout: float = _s(2.0, "on shutdown, seconds to wait for mirrors to deliver "
                                        "what their rings still hold, so a graceful restart of a "
                                        "publishing node loses nothing")
    # -- RDMA transport (daemon/peer/rdma/, docs/rdma.md) --
    transport: str = _s("auto", "peer data path: tcp, rdma (startup error without a usable RDMA "
                                "device) or auto (RDMA when both peers have a device and agree, "
                                "else TCP; fallbacks are logged and counted)",
                        choices=("tcp", "rdma", "auto"))
    rdma_device: str = _s("", "RDMA device or device:port for mirrors (empty: the first active "
                              "port)")
    rdma_small_write_threshold: int = _s(512, "committed ranges shorter than this many bytes are "
                                              "copied through the replica's mailbox (CPU path) "
                                              "instead of placed by RDMA WRITE; at most "
                                              "RDMA_MAX_SMALL_WRITE, capped per mirror by the "
                                              "path MTU")
    # -- survival: file descriptors, half-open and silent sessions (docs/daemon.md) --
    nofile_limit: int = _s(65536, "the daemon raises its RLIMIT_NOFILE soft limit to this at "
                                  "start (capped at the hard limit; the figure is logged)")
    accept_backoff: float = _s(0.1, "after accept() fails for lack of descriptors or memory "
                                    "(EMFILE, ENFILE, ENOMEM, ENOBUFS), stop accepting this long "
                                    "(seconds) and go on serving")
    session_connect_timeout: float = _s(2.0, "a hello whose session socket has not sent its "
                                             "token within this (seconds) is removed, and so is "
                                             "a session connection that sends no valid token")
    session_timeout: float = _s(30.0, "a session silent (no heartbeat) this long is closed and "
                                      "removed (seconds; more than lease_timeout)")
    # -- quotas: per container where the daemon identifies one, else per uid (docs/security.md) --
    quota_connections: int = _s(512, "session-socket connections at once per container/uid")
    quota_control_connections: int = _s(512, "control-socket connections at once per "
                                              "container/uid")
    quota_sessions: int = _s(512, "client sessions (hello) at once per container/uid")
    quota_channels: int = _s(4096, "channels and streams created and alive per container/uid")
    quota_subscribers: int = _s(8192, "subscriber slots held at once per container/uid")
    quota_shm_bytes: int = _s(4 << 30, "bytes of rings and streams created and alive per "
                                       "container/uid")
    # -- object ownership and modes (docs/security.md) --
    object_mode: str = _s("0600", "mode (octal) of the rings and semaphores of a channel that "
                                  "no group shares: owner only")
    shared_object_mode: str = _s("0660", "mode (octal) of the objects of a channel shared with "
                                         "a group (channel_group or a rule's gid)")
    channel_group: str = _s("", "group (name or gid) that owns every channel's objects; its "
                                "members may use every channel; empty = none")
    channel_rules: list = _s([], "rules opening channels to others: 'PATTERN who=... "
                                 "[ops=publish,subscribe,delete]' with who among uid=, gid=, "
                                 "label=KEY=VALUE, namespace= (docs/security.md)")
    socket_mode: str = _s("0666", "mode (octal) of the control and session sockets: who may "
                                  "connect at all (access is then decided per uid)")
    socket_group: str = _s("", "group (name or gid) of the control and session sockets; empty = "
                               "the daemon's")

    # -- observability (daemon/metrics.py, daemon/logformat.py, docs/metrics.md) --
    metrics_listen: str = _s("", "HOST:PORT serving Prometheus metrics at /metrics (e.g. "
                                 "127.0.0.1:9464); empty = no metrics endpoint")
    metrics_max_connections: int = _s(16, "metrics connections served at once; more are closed "
                                          "at accept (counted)")
    metrics_timeout: float = _s(10.0, "a metrics connection silent this long (reading its "
                                      "request or its reply) is closed (seconds)")
    log_format: str = _s("text", "log line format: 'text' (human) or 'json' (one JSON object per "
                                 "line, for log shippers)", choices=("text", "json"))

    # -- recorded channels (daemon/recordings.py, docs/recording.md) --
    record: list = _s([], "channel names or fnmatch patterns the daemon records into record_dir "
                          "(its recorder process); recorded channels come back, numbering and "
                          "history, after a daemon restart")
    record_dir: str = _s("", "where the daemon's recorder writes (required with record)")
    record_mode: str = _s("reliable", "the daemon's recordings: reliable (holds publishers back, "
                                      "loses nothing) or lossy (never holds them back, records "
                                      "every gap)", choices=("reliable", "lossy"))
    record_segment_bytes: int = _s(64 << 20, "a recording's segment file is closed past this "
                                             "size (>= 64 KiB)")
    record_max_bytes: int = _s(0, "retention by size, per recorded channel (0 = keep all)")
    record_max_age: float = _s(0.0, "retention by age in seconds (0 = keep all)")
    record_fsync: str = _s("none", "none (page cache), data (fdatasync each chunk) or "
                                   "data+metadata (fsync chunk, catalog, new segments' "
                                   "directory entries)",
                           choices=("none", "data", "data+metadata"))

    def validate(self) -> "Settings":
        _check_types(self)
        try:
            ring.check_capacity(self.default_capacity)
            ring.check_capacity(self.max_capacity)
        except ValueError as exc:
            raise SettingError(f"default_capacity/max_capacity: {exc}") from None
        if self.default_capacity > self.max_capacity:
            raise SettingError("default_capacity must not exceed max_capacity")
        if not 1 <= self.max_subscribers <= ring.MAX_SUBSCRIBERS_LIMIT:
            raise SettingError(f"max_subscribers must be 1..{ring.MAX_SUBSCRIBERS_LIMIT}")
        if not 1 <= self.max_publishers <= ring.MAX_PUBLISHERS_LIMIT:
            raise SettingError(f"max_publishers must be 1..{ring.MAX_PUBLISHERS_LIMIT}")
        if not 1 <= self.default_max_publishers <= self.max_publishers:
            raise SettingError(f"default_max_publishers must be 1..max_publishers "
                               f"({self.max_publishers})")
        for name in ("max_channels", "max_clients", "request_max_bytes", "nofile_limit",
                     "quota_connections", "quota_control_connections", "quota_sessions",
                     "metrics_max_connections",
                     "quota_channels",
                     "quota_subscribers", "quota_shm_bytes"):
            if getattr(self, name) < 1:
                raise SettingError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("shm_budget", "shm_reserve"):
            if getattr(self, name) < 0:
                raise SettingError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("idle_channel_ttl", "idle_channel_unread_ttl", "stream_orphan_timeout"):
            if not 0 <= getattr(self, name) < float("inf"):
                raise SettingError(f"{name} must be >= 0 seconds (0 = kept until deleted), got "
                                   f"{getattr(self, name)}")
        for name in ("accept_backoff", "session_connect_timeout",
                     "control_request_timeout", "metrics_timeout",
                     "peer_dns_interval", "peer_handshake_timeout", "peer_link_timeout",
                     "peer_keepalive", "peer_hold", "peer_credit_interval",
                     "peer_unmirror_grace"):
            if not getattr(self, name) > 0:
                raise SettingError(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        if not 0 < self.heartbeat_interval < self.lease_timeout:
            raise SettingError(f"need 0 < heartbeat_interval ({self.heartbeat_interval}) < "
                               f"lease_timeout ({self.lease_timeout})")
        if not self.session_timeout > self.lease_timeout:
            raise SettingError(f"session_timeout ({self.session_timeout}) must exceed "
                               f"lease_timeout ({self.lease_timeout})")
        for setting in dataclasses.fields(self):
            choices = setting.metadata.get("choices")
            if choices and getattr(self, setting.name) not in choices:
                raise SettingError(f"{setting.name} must be one of {', '.join(choices)}, got "
                                   f"{getattr(self, setting.name)!r}")
        for name in ("object_mode", "shared_object_mode", "socket_mode"):
            parse_mode(name, getattr(self, name))
        for name in ("object_mode", "shared_object_mode"):
            if parse_mode(name, getattr(self, name)) & 0o007:
                raise SettingError(f"{name}={getattr(self, name)} gives other users access to "
                                   f"channel memory; use a group (channel_group) instead, or "
                                   f"access='open' on a single-tenant host")
        for name in ("channel_group", "socket_group"):
            if getattr(self, name):
                gid = resolve_group(name, getattr(self, name))
                if os.geteuid() != 0 and gid not in (os.getegid(), *os.getgroups()):
                    raise SettingError(f"{name}={getattr(self, name)}: the daemon (uid "
                                       f"{os.geteuid()}) is not a member of group {gid}, so it "
                                       f"cannot give its objects to that group")
        for rule in self.peers + self.channel_rules:
            if not isinstance(rule, str):
                raise SettingError(f"peers and channel_rules entries must be strings, got "
                                   f"{rule!r}")
        for rule in self.channel_rules:
            parse_rule(rule)
        _check_dir("shm_dir", self.shm_dir)
        _check_dir("socket", os.path.dirname(os.path.abspath(self.socket)) or "/", create=True)
        for name in ("cluster_key_file", "peer_tls_cert", "peer_tls_key", "peer_tls_ca"):
            path = getattr(self, name)
            if path and not os.access(path, os.R_OK):
                raise SettingError(f"{name}={path}: not a readable file")
        if (self.peer_listen or self.peers or self.peer_dns) and not self.cluster_key_file:
            raise SettingError("peering (peer_listen/peers) needs cluster_key_file: peers are "
                               "authenticated with a shared key")
        if not 0 < self.peer_backoff_initial <= self.peer_backoff_max:
            raise SettingError("need 0 < peer_backoff_initial <= peer_backoff_max")
        if not self.peer_forget_after > 0 or self.peer_drain_timeout < 0:
            raise SettingError("need peer_forget_after > 0 and peer_drain_timeout >= 0")
        if self.peer_max_replica_capacity > ring.MAX_CAPACITY:
            raise SettingError(f"peer_max_replica_capacity must be <= {ring.MAX_CAPACITY}")
        if self.metrics_listen:
            try:
                parse_listen(self.metrics_listen)
            except ValueError as exc:
                raise SettingError(str(exc)) from None
        self._validate_rdma()
        self._validate_record()
        return self

    def _validate_record(self) -> None:
        if any(not isinstance(p, str) or not p for p in self.record):
            raise SettingError(f"record entries must be channel names or patterns, got "
                               f"{self.record!r}")
        if self.record and not self.record_dir:
            raise SettingError("record needs record_dir: where the recordings are written")
        if self.record:
            _check_dir("record_dir", self.record_dir, create=True)
        from shimmy.recording import RecordSettings
        try:
            RecordSettings(segment_bytes=self.record_segment_bytes,
                           max_bytes=self.record_max_bytes, max_age=self.record_max_age,
                           fsync=self.record_fsync)
        except ValueError as exc:
            raise SettingError(f"record_segment_bytes/record_max_bytes/record_max_age: "
                               f"{exc}") from None

    def _validate_rdma(self) -> None:
        if not 0 <= self.rdma_small_write_threshold <= RDMA_MAX_SMALL_WRITE:
            raise SettingError(f"rdma_small_write_threshold={self.rdma_small_write_threshold}: "
                               f"must be 0..{RDMA_MAX_SMALL_WRITE} bytes")
        if self.transport == "rdma":
            from shimmy.daemon.peer import rdma
            ok, why = rdma.available(self.rdma_device)
            if not ok:
                raise SettingError(f"transport=rdma but RDMA is not usable here: {why}; use "
                                   f"transport=auto (falls back to TCP) or transport=tcp")


RDMA_MAX_SMALL_WRITE = 4032   # mailbox slot payload at the largest path MTU (4096 - 64 header)


def _check_types(settings: Settings) -> None:
    """Every value has its field's type (an int where a float is expected is fine)."""
    for f in dataclasses.fields(settings):
        value = getattr(settings, f.name)
        want = type(f.default) if f.default is not dataclasses.MISSING else list
        ok = isinstance(value, want) and not (isinstance(value, bool) and want is not bool)
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            setattr(settings, f.name, float(value))
            ok = True
        if not ok:
            raise SettingError(f"setting {f.name} must be {want.__name__}, got "
                               f"{type(value).__name__} {value!r}")


def _check_dir(name: str, path: str, create: bool = False) -> None:
    if create and not os.path.exists(path):
        try:
            os.makedirs(path, mode=0o755, exist_ok=True)
        except OSError as exc:
            raise SettingError(f"{name}: cannot create directory {path}: {exc.strerror}") from None
    if not os.path.isdir(path):
        raise SettingError(f"{name}: {path} is not an existing directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise SettingError(f"{name}: directory {path} is not writable by the daemon "
                           f"(uid {os.geteuid()})")


def load(path: str | None, **overrides) -> Settings:
    values: dict = {}
    if path:
        try:
            with open(path, "rb") as fh:
                values = tomllib.load(fh)
        except tomllib.TOMLDecodeError as exc:
            raise SettingError(f"{path}: not valid TOML: {exc}") from None
        known = {f.name for f in dataclasses.fields(Settings)}
        unknown = set(values) - known
        if unknown:
            raise SettingError(f"{path}: unknown settings {sorted(unknown)}; known: "
                               f"{sorted(known)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return Settings(**values).validate()
