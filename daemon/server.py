"""The node daemon: one thread, one poll loop over the control socket and the session sockets.

The daemon is the control plane only.  It never touches message bytes on the local data path: it
creates and sizes rings, grants the publisher role and subscriber slots, watches liveness, reclaims
what dead clients held, and answers stats.  Any request, however malformed, gets an error reply
(a frame that is not one msgpack map also closes its connection: daemon/control.py) and the loop
goes on.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import logging
import os
import queue
import resource
import secrets
import select
import signal
import threading
import time

import msgpack

from shimmy import ring
from shimmy.errors import (ChannelConflict, ChannelNotFound, InvalidArgument, LimitExceeded,
                           PermissionDenied, ProtocolError, ShimmyError)
from shimmy.names import object_token, validate_name
from shimmy.protocol import PROTOCOL_VERSION, session_path

from . import containers, identity, label_policy, logformat, metrics
from .access import AccessControl, Ownership
from .config import Settings
from .identity import Caller
from .control import Conn, ControlListener
from .setting_values import parse_mode, resolve_group
from .quotas import Quotas, tenant
from .recordings import Recordings
from .registry import Registry, alias_prefix, is_member_alias
from .segments import Segments
from .sessions import RESOURCE_ERRNOS, Client, Sessions
from .streams import StreamService

log = logging.getLogger("shimmy.daemon")
DOCKER_SOCKET = "/var/run/docker.sock"
TICK = 0.1  # seconds between housekeeping passes (lease checks, idle channels)


PID_MAX = 1 << 22          # Linux pid_max ceiling (PID_MAX_LIMIT)
ID_MAX = (1 << 63) - 1
FD_HEADROOM = 64           # descriptors kept for the daemon's own files, rings and semaphores
                           # being opened, pipes, and the Docker watcher, beyond connections
LOCK_MODE = 0o600          # nobody else may open (and so flock) the lock file


def raise_nofile_limit(want: int) -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to ``want`` (capped at the hard limit; never
    lowered); return the (soft, hard) limits now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = want if hard == resource.RLIM_INFINITY else min(want, hard)
    if target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise RLIMIT_NOFILE from %d to %d: %s", soft, target, exc)
    return resource.getrlimit(resource.RLIMIT_NOFILE)


class Daemon:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.started = time.time()
        # Anything made without an explicit mode is private; every object then gets its real
        # mode and group explicitly (fchmod/fchown; sockets by path, see _prepare_socket).
        os.umask(0o077)
        self.nofile = raise_nofile_limit(settings.nofile_limit)
        self.socket_path = os.path.abspath(settings.socket)
        os.makedirs(os.path.dirname(self.socket_path), mode=0o755, exist_ok=True)
        self.access = AccessControl(settings)
        self.quotas = Quotas(settings)
        self.segments = Segments(self.socket_path, settings.shm_dir, settings.shm_reserve,
                                 settings.shm_budget)
        self.segments.default = self.access.default_ownership()
        self.registry = Registry(settings, self.segments)
        self.owners: dict[str, tuple[object, Ownership]] = {}   # name -> (record, ownership)
        self.tenants: dict[int, str] = {}        # client id -> quota account, orphans included
        self.orphans: dict[int, Client] = {}     # pidfd -> silent client whose session we closed
        self.counters = {"requests": 0, "errors": 0, "malformed": 0, "clients_total": 0,
                         "clients_exited": 0, "clients_crashed": 0, "leases_expired": 0,
                         "slots_reclaimed": 0, "peer_tick_errors": 0,
                         "metrics_connections_refused": 0, "metrics_accept_errors": 0,
                         "metrics_connection_errors": 0}
        self._stop = False
        self._conn: Conn | None = None   # the control connection of the request being handled
        # One daemon per socket: the lock dies with its holder, so a crashed daemon never blocks
        # its successor, and the successor alone may sweep what it left.
        self._lock = self._take_lock(self.socket_path + ".lock")
        self.swept = self.segments.sweep()
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)  # stale socket of a dead daemon: we hold the lock
        # Control and session connections share the descriptors left after FD_HEADROOM and what
        # the other listeners may hold at most (metrics connections, peer handshakes and links).
        self.max_conn_fds = max(16, self.nofile[0] - FD_HEADROOM - settings.metrics_max_connections
                                - (settings.peer_max_pending + settings.peer_max_links
                                   if settings.peer_listen or settings.peers
                                   or settings.peer_dns else 0))
        self.control = ControlListener(self.socket_path, settings, tenant, self._prepare_socket,
                                       self._room, self._handle)
        self.sessions = Sessions(session_path(self.socket_path), settings, tenant,
                                 self._prepare_socket, self._room)
        # Peering (docs/peering.md): own threads for sockets and data; registry changes arrive
        # here as events through a pipe this loop polls (PeerService.fds / on_readable).
        from .peer.service import PeerService
        self.peer = PeerService(self)
        # Recorded channels (docs/recording.md): the recorder process, numbering across restarts.
        self.recordings = Recordings(settings, self.socket_path)
        # Identity and access (docs/containers.md): peer credentials -> cgroup -> labels.
        self.labels = containers.DockerLabelSource()
        self._deaths: "queue.SimpleQueue[str]" = queue.SimpleQueue()
        self._death_r, self._death_w = os.pipe()
        os.set_blocking(self._death_r, False)
        os.set_blocking(self._death_w, False)
        self._stop_watch = threading.Event()
        if os.path.exists(DOCKER_SOCKET):
            threading.Thread(target=containers.watch_container_deaths, name="container-deaths",
                             args=(self._on_container_death, self._stop_watch),
                             daemon=True).start()
        self.ops = {
            "ping": self.op_ping, "hello": self.op_hello, "open": self.op_open,
            "publish": self.op_publish, "unpublish": self.op_unpublish,
            "subscribe": self.op_subscribe, "unsubscribe": self.op_unsubscribe,
            "close": self.op_close, "list": self.op_list, "stat": self.op_stat,
            "delete": self.op_delete, "members": self.op_members,
        }
        self.streams = StreamService(self)
        self.ops.update(self.streams.ops())
        self.control_stats = metrics.ControlStats()   # by op and error code, for /metrics
        self.exporter: metrics.Exporter | None = None   # started by run()

    def _take_lock(self, path: str) -> int:
        """Open (creating 0600, never following a link) and flock the lock file.  A lock file
        owned by another uid (planted to be flock-ed by its owner) is replaced."""
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            fd = os.open(path, flags, LOCK_MODE)
        except OSError as exc:
            raise SystemExit(f"cannot open lock file {path}: {exc.strerror}") from None
        if os.fstat(fd).st_uid != os.geteuid():
            os.close(fd)
            log.warning("lock file %s belongs to another uid: replacing it", path)
            os.unlink(path)
            fd = os.open(path, flags | os.O_EXCL, LOCK_MODE)
        os.fchmod(fd, LOCK_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SystemExit(f"another shimmy daemon is running on {self.socket_path}") from None
        return fd

    def _prepare_socket(self, path: str) -> None:
        """Give a listening socket its mode and group from the settings.  ``fchmod`` on a socket
        descriptor does not reach the file a unix socket is bound to, so this goes by path, in
        the daemon's own directory, right after bind (the umask made it private meanwhile)."""
        s = self.settings
        if s.socket_group:
            os.chown(path, -1, resolve_group("socket_group", s.socket_group),
                     follow_symlinks=False)
        os.chmod(path, parse_mode("socket_mode", s.socket_mode))

    def _room(self) -> int:
        """Connections (control or session) the descriptor budget still allows.  Every ring the
        daemon maps holds a descriptor too (Python's mmap keeps a duplicate of the one it was
        given), so channels and streams come off the budget as well."""
        return (self.max_conn_fds - self.control.open_fds() - self.sessions.open_fds()
                - len(self.registry.channels) - len(self.streams.streams))

    # -- loop --------------------------------------------------------------------------------------
    def run(self) -> None:
        log.info("daemon ready socket=%s pid=%d swept=%d nofile=%d (hard %d) access=%s",
                 self.socket_path, os.getpid(), self.swept, self.nofile[0], self.nofile[1],
                 self.settings.access)
        s = self.settings
        need = FD_HEADROOM + 2 * s.max_channels + 2 * s.max_clients
        if self.nofile[0] < need:
            log.warning("nofile limit %d is below what max_channels=%d (and as many streams) and "
                        "max_clients=%d may need (%d descriptors: one per ring, two per client); "
                        "past it new channels and connections are refused for lack of "
                        "descriptors: raise the hard limit (ulimit -Hn, LimitNOFILE=) or lower "
                        "those settings", self.nofile[0], s.max_channels, s.max_clients, need)
        last_tick = time.monotonic()
        try:
            self.exporter = metrics.start(self, self.settings.metrics_listen)
            self.recordings.start()
            while not self._stop:
                poller = select.poll()
                control = self.control.poll_events(last_tick)
                for fd, events in control.items():
                    poller.register(fd, events)
                for fd in self.sessions.fds(last_tick):
                    poller.register(fd, select.POLLIN)
                for fd in self.orphans:
                    poller.register(fd, select.POLLIN)
                poller.register(self._death_r, select.POLLIN)
                peer_fds = self.peer.fds()
                for fd in peer_fds:
                    poller.register(fd, select.POLLIN)
                # Requests already buffered are answered without waiting (daemon/control.py).
                wait = 0 if self.control.ready else int(TICK * 1000)
                for fd, events in poller.poll(wait):
                    if fd in control:
                        self.control.on_event(fd, events)
                    elif fd == self._death_r:
                        self._drain_deaths()
                    elif fd in peer_fds:
                        self.peer.on_readable(fd)
                    elif fd in self.orphans:
                        self._orphan_exited(fd)
                    else:
                        for client in self.sessions.on_readable(fd):
                            self._client_gone(client, crashed=not client.said_goodbye)
                self.control.serve_ready()
                now = time.monotonic()
                if now - last_tick >= TICK:
                    last_tick = now
                    self._housekeeping(now)
        finally:
            self.shutdown()

    def stop(self, *_args) -> None:
        self._stop = True

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)

    def shutdown(self) -> None:
        log.info("daemon stopping: retiring %d channels", len(self.registry.channels))
        if self.exporter is not None:
            self.exporter.stop()   # no scrape reads rings while they are retired
        self._stop_watch.set()
        self.recordings.stop()   # the recorder commits its last chunk before rings retire
        self.peer.shutdown()  # mirror threads stop reading rings before they are retired
        self.streams.close_all()
        self.registry.close_all()
        self.sessions.close()
        for fd in self.orphans:
            os.close(fd)
        self.orphans.clear()
        self.control.close()
        for path in (self.socket_path, self.socket_path + ".lock"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        os.close(self._lock)
        log.info("daemon stopped")

    def _housekeeping(self, now: float) -> None:
        lapsed, ghosts, silent = self.sessions.expired(now)
        for client in lapsed:
            n = self.registry.evict_client_slots(client.id)
            self.counters["leases_expired"] += 1
            log.warning("client %d pid=%s missed heartbeats for lease_timeout=%.1fs: evicted %d "
                        "subscriber slots", client.id, client.pid, self.settings.lease_timeout, n)
        for client in ghosts:
            self._client_gone(client, crashed=False)
        for client in silent:
            self._orphan(client)
        self.control.expire(now)
        self._remote_members()
        self.registry.reclaim_all()
        self.registry.expire_idle()
        self.streams.reap(now)
        self.recordings.tick(now)
        try:
            self.peer.tick(now)
        except Exception:   # the peer module must never take the node's channels down with it
            self.counters["peer_tick_errors"] += 1
            log.exception("peer housekeeping failed; the daemon goes on (next pass retries)")

    def _remote_members(self) -> None:
        """Members of our publisher groups on other nodes (announced by their daemons under
        ``<channel>/.p<id>.<node>``) join the group here as replicas; one no longer announced
        has left (reclaimed once our subscribers drained it).  spec/ring.md."""
        peer = self.peer
        groups = [r for r in self.registry.channels.values() if r.group]
        if not peer.enabled or not groups:
            return
        announced = peer.published_elsewhere()
        for rec in groups:
            prefix = alias_prefix(rec.name)
            want = {n: node for n, node in announced.items()
                    if n.startswith(prefix) and "/" not in n[len(prefix):]}
            have = {m.rec.name: m for m in rec.members.values() if m.remote}
            for alias, node in want.items():
                if alias not in have and alias not in self.registry.channels:
                    try:
                        self.registry.join_remote(
                            rec, alias, node,
                            lambda a=alias, n=node: peer.replica_side.replicate(a, n))
                    except ShimmyError as exc:
                        log.warning("channel %s: cannot add publisher %s of node %s: %s",
                                    rec.name, alias, node, exc)
            for alias, m in have.items():
                if alias not in want and m.client is not None:
                    m.client = None   # left on its node: reclaimed once drained here
                    log.info("channel %s: publisher %d on node %s left", rec.name, m.publisher,
                             m.node)
            peer_subscribe = [m.rec for m in rec.members.values() if m.remote and m.rec.slots]
            for mrec in peer_subscribe:
                peer.on_subscribe(mrec)

    def _orphan(self, client: Client) -> None:
        """A client silent for session_timeout: its session is closed and it no longer counts
        as a client.  While its process lives, its EVICTED slots and publisher role stay
        reserved (it may wake up and write to them: one writer per word); a pidfd tells the
        loop when it exits."""
        fd = None
        if client.pid:
            try:
                fd = os.pidfd_open(client.pid)
            except (OSError, AttributeError):
                fd = None
        log.warning("client %d pid=%s silent for session_timeout=%.1fs: session closed%s",
                    client.id, client.pid, self.settings.session_timeout,
                    "; its slots stay reserved until it exits" if fd is not None else "")
        if fd is None:
            self._client_gone(client, crashed=False)
        else:
            self.orphans[fd] = client

    def _orphan_exited(self, fd: int) -> None:
        client = self.orphans.pop(fd)
        os.close(fd)
        self._client_gone(client, crashed=True)

    def _on_container_death(self, container_id: str) -> None:
        """Watcher thread: hand the event to the loop thread (the only one touching state)."""
        self._deaths.put(container_id)
        try:
            os.write(self._death_w, b"d")
        except BlockingIOError:
            pass

    def _drain_deaths(self) -> None:
        try:
            os.read(self._death_r, 4096)
        except BlockingIOError:
            pass
        while not self._deaths.empty():
            cid = self._deaths.get()
            self.labels.forget(cid)
            for client in list(self.sessions.clients.values()):
                if client.container == cid:
                    log.info("container %s died: reclaiming client %d", cid[:12], client.id)
                    self.sessions.disconnect(client)
                    self._client_gone(client, crashed=True)

    def _policy(self, client: Client) -> label_policy.LabelPolicy:
        policy = client.policy
        if policy is None:
            if client.sock is None:
                self.sessions.settle()
            policy = label_policy.policy_for_pid(client.pid, self.labels,
                                             default_open=self.settings.access != "closed")
            client.container = policy.container_id
            if client.sock is not None:
                client.policy = policy  # identified for good; before that, ask again next time
        assert isinstance(policy, label_policy.LabelPolicy)
        return policy

    def _caller(self, client: Client) -> Caller:
        """Who the client is for the access policy: the uid, groups and container the kernel
        reports for its session socket (never what it claims)."""
        if isinstance(client.caller, Caller):
            return client.caller
        self._policy(client)  # identifies the container
        if client.uid is None or client.gid is None:
            raise PermissionDenied(
                f"client {client.id} has not presented its session token on "
                f"{self.sessions.path}; a client connects its session (spec/control.md) before "
                f"any channel request, which is how the daemon learns its uid")
        labels: dict = {}
        if client.container is not None:
            try:
                labels = self.labels.labels(client.container) or {}
            except Exception:  # the label source must not take a request down
                labels = {}
        caller = Caller(client.uid, client.gid, identity.supplementary_groups(client.pid),
                        client.pid, client.container, tuple(sorted(labels.items())))
        client.caller = caller
        return caller

    def _client_gone(self, client: Client, crashed: bool) -> None:
        slots, roles = self.registry.drop_client(client.id)
        self.streams.drop_client(client.id)
        self.tenants.pop(client.id, None)
        self.counters["slots_reclaimed"] += slots
        self.counters["clients_crashed" if crashed else "clients_exited"] += 1
        log.info("client %d pid=%s gone: freed %d slots, %d publisher roles", client.id,
                 client.pid, slots, roles)

    @staticmethod
    def _error(exc: ShimmyError) -> dict:
        return {"ok": False, "error": {"code": exc.code, "message": str(exc)}}

    def _handle(self, payload: bytes, conn: Conn) -> tuple[dict, bool]:
        """The reply to one request frame, and whether its connection is to be closed after it
        (a frame that is not one msgpack map: spec/control.md, "Framing")."""
        req_id, reply, close = self._answer(payload, conn)
        reply["v"] = PROTOCOL_VERSION
        reply["id"] = req_id
        return reply, close

    def _answer(self, payload: bytes, conn: Conn):
        self.counters["requests"] += 1
        req_id = None
        op_label = metrics.OP_MALFORMED   # the metrics label until the op is known
        close = True                      # until the payload is known to be one map
        try:
            try:
                # Size is already bounded by request_max_bytes (daemon/control.py).
                req = msgpack.unpackb(payload, raw=False, strict_map_key=True)
            except Exception as exc:
                raise ProtocolError(f"request is not one msgpack map: {type(exc).__name__}: "
                                    f"{_show(str(exc))}") from None
            if not isinstance(req, dict):
                raise ProtocolError(f"request must be a msgpack map, got {type(req).__name__}")
            close = False
            rid = req.get("id")
            req_id = rid if isinstance(rid, int) and not isinstance(rid, bool) \
                and 0 <= rid <= ID_MAX else None
            if req.get("v") != PROTOCOL_VERSION:
                raise ProtocolError(f"client speaks control protocol v{_show(req.get('v'))}; "
                                    f"this daemon speaks v{PROTOCOL_VERSION}")
            if "id" in req and req_id is None:
                raise InvalidArgument(f"field 'id' must be an int in 0..{ID_MAX}, got "
                                      f"{_show(req.get('id'))}")
            op = req.get("op")
            handler = self.ops.get(op) if isinstance(op, str) else None
            if handler is None:
                raise ProtocolError(f"unknown op {_show(op)}; known: {sorted(self.ops)}")
            op_label = str(op)
            self._conn = conn   # the kernel's word on who sent it (op_hello reads it)
            result = handler(req)
            result["ok"] = True
            self.control_stats.count(op_label)
            return req_id, result, close
        except ShimmyError as exc:
            self.control_stats.count(op_label, exc.code)
            self.counters["errors"] += 1
            if isinstance(exc, ProtocolError):
                self.counters["malformed"] += 1
            return req_id, self._error(exc), close
        except OSError as exc:
            self.counters["errors"] += 1
            if exc.errno in RESOURCE_ERRNOS or exc.errno == errno.ENOSPC:
                # Out of descriptors or memory right now: the client may retry; nothing broke.
                log.warning("request refused for lack of resources: %s", exc)
                return req_id, self._error(LimitExceeded(
                    f"the daemon is out of resources ({exc.strerror}; {self.sessions.open_fds()} "
                    f"session and {self.control.open_fds()} control connections, nofile limit "
                    f"{self.nofile[0]}); try again")), close
            log.exception("internal error handling a request")
            return req_id, self._error(ShimmyError(
                f"internal daemon error: {type(exc).__name__}: {exc}")), close
        except Exception as exc:  # a bug must not take the node's channels down with it
            self.control_stats.count(op_label, metrics.CODE_INTERNAL)
            self.counters["errors"] += 1
            log.exception("internal error handling a request")
            return req_id, self._error(ShimmyError(
                f"internal daemon error: {type(exc).__name__}: {exc}")), close

    # -- request helpers ---------------------------------------------------------------------------
    @staticmethod
    def _field(req: dict, key: str, kind, optional: bool = False, lo: int | None = None,
               hi: int | None = None):
        """``req[key]`` checked for type (and, for ints, for the range lo..hi)."""
        value = req.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise InvalidArgument(f"field {key!r} must be {getattr(kind, '__name__', kind)}, "
                                  f"got {type(value).__name__}")
        if kind is int and ((lo is not None and value < lo) or (hi is not None and value > hi)):
            raise InvalidArgument(f"field {key!r} must be in {lo}..{hi}, got {_show(value)}")
        if kind is str and len(value) > 256:
            raise InvalidArgument(f"field {key!r} is {len(value)} characters; at most 256")
        return value

    def _client(self, req: dict) -> Client:
        """The client a request speaks for.  Client ids are small integers anyone could guess,
        so a request must also carry the client's secret token from ``hello``: a process cannot
        act (and be judged by the access policy) as another."""
        cid = self._field(req, "client", int, lo=1, hi=ID_MAX)
        client = self.sessions.clients.get(cid)
        if client is None:
            raise InvalidArgument(f"unknown client {cid}; say hello first")
        token = req.get("token")
        if not isinstance(token, str) or not token.isascii() or \
                not secrets.compare_digest(token, client.token):
            raise PermissionDenied(f"request for client {cid} without that client's token")
        return client

    def _channel(self, req: dict):
        return self.registry.get(validate_name(req.get("name")))

    def owner(self, name: str) -> Ownership | None:
        """The ownership of live channel ``name`` (None: made for no client, e.g. a replica)."""
        entry = self.owners.get(name)
        if entry is None:
            return None
        if entry[0] is not self.registry.channels.get(name):
            del self.owners[name]   # the channel it was recorded for is gone
            return None
        return entry[1]

    def authorize(self, client: Client, op: str, name: str, owner: Ownership | None,
                  kind: str = "channel") -> None:
        """Both layers: container labels (label_policy) and ownership (access); ``kind`` ("channel"
        or "stream") is what refusals call the object."""
        policy = self._policy(client)
        if op in ("publish", "subscribe"):
            policy.check(op, name)
        elif op == "open":
            policy.check_open(name)
        self.access.check(self._caller(client), op, name, owner, kind)

    def tenant_usage(self, who: str) -> tuple[int, int]:
        """(channels and streams, bytes of shared memory) tenant ``who`` created and holds."""
        count = size = 0
        for name in list(self.owners):
            own = self.owner(name)
            if own is not None and own.principal == who:
                count += not own.member   # a publisher's member ring is bytes, not a channel
                size += own.size
        for st in self.streams.owned_by(who):
            count += 1
            size += st
        return count, size

    def check_create_quota(self, who: str, size: int) -> None:
        count, used = self.tenant_usage(who)
        self.quotas.check("channels", who, count)
        self.quotas.check("shm_bytes", who, used, size)

    def _visible(self, req: dict):
        """The caller of a list/stat request, or None when it may see everything."""
        if self.settings.access == "open":
            return None
        if req.get("client") is None:
            return False   # anonymous: no channel details
        caller = self._caller(self._client(req))
        return None if caller.uid == 0 else caller

    def _channels_for(self, req: dict) -> tuple[list[dict], int]:
        who = self._visible(req)
        shown, hidden = [], 0
        now = time.monotonic()
        for rec in self.registry.channels.values():
            if rec.group_of is not None:
                continue   # a member ring: listed under its channel's publishers
            if who is None or (who is not False and self.access.allows(
                    who, "stat", rec.name, self.owner(rec.name))):
                entry = self.peer.annotate(rec.describe())
                if rec.idle_since is not None and not rec.attached():
                    # No ends attached: when it goes, and what unread it would take along
                    # (docs/daemon.md, "Idle channels"); in_s None = kept until deleted.
                    left, unread = self.registry.reclaim_in(rec, now)
                    entry["idle"] = {"for_s": round(now - rec.idle_since, 3),
                                     "unread_bytes": unread,
                                     "reclaim_in_s": None if left is None else round(left, 3)}
                shown.append(entry)
            else:
                hidden += 1
        return shown, hidden

    # -- operations --------------------------------------------------------------------------------
    def op_ping(self, req: dict) -> dict:
        return {"pid": os.getpid(), "uptime": time.time() - self.started,
                "protocol": PROTOCOL_VERSION}

    def op_hello(self, req: dict) -> dict:
        pid = self._field(req, "pid", int, lo=1, hi=PID_MAX)
        conn = self._conn
        uid, real_pid = (conn.uid, conn.pid or None) if conn is not None else (None, None)
        who = conn.tenant if conn is not None else tenant(None, None)
        if len(self.sessions.clients) >= self.settings.max_clients:
            raise LimitExceeded(f"max_clients ({self.settings.max_clients}) clients attached")
        self.quotas.check("sessions", who, self.sessions.count(who))
        client = self.sessions.new_client(pid, who, uid)
        self.tenants[client.id] = who
        self.counters["clients_total"] += 1
        return {"client": client.id, "token": client.token, "session": self.sessions.path,
                "heartbeat_interval": self.settings.heartbeat_interval,
                "lease_timeout": self.settings.lease_timeout,
                "protocol": PROTOCOL_VERSION, "ring_format": ring.LAYOUT_VERSION}

    def op_open(self, req: dict) -> dict:
        client = self._client(req)
        name = validate_name(req.get("name"))
        mode = self._field(req, "mode", str, optional=True)
        capacity = self._field(req, "capacity", int, optional=True, lo=1, hi=ring.MAX_CAPACITY)
        create = self._field(req, "create", bool, optional=True)
        create = True if create is None else create
        pubs = self._field(req, "max_publishers", int, optional=True, lo=1,
                           hi=ring.MAX_PUBLISHERS_LIMIT)
        if is_member_alias(name):
            raise InvalidArgument(f"channel name {name!r} is reserved: a last segment '.p<id>."
                                  f"<node>' names a publisher's ring of a multi-publisher "
                                  f"channel; open that channel instead")
        if name in self.registry.channels:
            self.authorize(client, "open", name, self.owner(name))
            rec = self.registry.open(client.id, name, mode, capacity, create, pubs)
        elif not create:
            raise ChannelNotFound(f"channel {name!r} does not exist")
        else:
            rec = self._create_channel(client, name, mode, capacity, create, pubs)
        return {"shm": rec.shm_name, "sem_prefix": self.segments.sem_prefix(rec.token),
                "mode": ring.MODE_NAMES[rec.mode], "capacity": rec.capacity,
                "max_message": ring.max_message_size(rec.capacity),
                "max_publishers": rec.max_publishers}

    def _create_channel(self, client: Client, name: str, mode, capacity, create: bool,
                        max_publishers: int | None = None):
        self._policy(client).check_open(name)
        if max_publishers is None and capacity is None and self.peer.enabled:
            # An open that leaves the shape to the channel, of a name a peer holds as a
            # publisher group: a group here too (subscribers need not know how many publishers
            # there are, or where).  Stating a capacity or max_publishers keeps the choice.
            group = self.peer.announced_group(name)
            if group is not None and mode in (None, group[0]):
                mode, capacity, max_publishers = group
        caller = self._caller(client)
        who = client.tenant
        ownership = self.access.ownership_for(caller, name, who)
        cap = self.settings.default_capacity if capacity is None else capacity
        pubs = self.settings.default_max_publishers if max_publishers is None else max_publishers
        if isinstance(pubs, int) and pubs > 1:
            # A group's own ring is made at the smallest capacity (registry.open): its messages
            # live in its publishers' member rings, each charged when it attaches (op_publish).
            cap = ring.MIN_CAPACITY
        try:
            size = ring.segment_size(cap, self.settings.max_subscribers)
        except (ValueError, OverflowError):
            size = 0   # an invalid capacity: the registry names the rule
        self.check_create_quota(who, size)
        ownership = dataclasses.replace(ownership, size=size)
        token = object_token(name)
        self.segments.claim(token, ownership)
        if max_publishers is not None and max_publishers > 1 and self.peer.enabled:
            node = self.peer.find_publisher(name)[0]
            if node is not None:
                raise ChannelConflict(
                    f"channel {name!r} is published on node {node.remote!r} as a "
                    f"single-publisher channel; it cannot be a multi-publisher channel here: "
                    f"open it without max_publishers (its messages mirror here), or use "
                    f"another name")
        try:
            self.peer.replica_side.prepare_open(name, mode, capacity)  # a peer publishes it
            rec = self.registry.open(client.id, name, mode, capacity, create, max_publishers)
        except BaseException:
            if name not in self.registry.channels:
                self.segments.unclaim(token)
            raise
        self.owners[name] = (rec, ownership)
        self.recordings.on_created(rec)   # a recorded channel continues its numbering
        return rec

    def op_close(self, req: dict) -> dict:
        client = self._client(req)
        rec = self._channel(req)
        rec.holders.discard(client.id)
        key = self._field(req, "key", int, optional=True, lo=0, hi=ID_MAX)
        self.registry.release_publisher(rec, client.id, key)
        if not rec.holders:
            rec.idle_since = time.monotonic()
        return {}

    def op_publish(self, req: dict) -> dict:
        client = self._client(req)
        rec = self._channel(req)
        self.authorize(client, "publish", rec.name, self.owner(rec.name))
        self.peer.check_publish(rec)  # one publisher cluster-wide: names the node holding it
        key = self._field(req, "key", int, optional=True, lo=0, hi=ID_MAX) or 0
        carry = self._field(req, "carry", dict, optional=True)   # Channel.reopen
        size = 0
        if rec.group and not any(m.client == client.id and m.key == key
                                 for m in rec.members.values()):
            # A new member ring: its bytes are the publisher's tenant's, like a channel it made
            # (so attaching many publishers cannot go past quota_shm_bytes).
            size = ring.segment_size(rec.capacity, rec.max_subscribers)
            self.quotas.check("shm_bytes", client.tenant, self.tenant_usage(client.tenant)[1],
                              size)
        member = self.registry.grant_publisher(rec, client.id, client.pid or client.claimed_pid,
                                               key)
        if member is None:
            if carry is not None:
                self.peer.source_side.carry(rec, carry)   # the empty ring where its stream left off
            return {}
        self.peer.source_side.hold_member(rec.name, member.rec)  # peers with the group get it all
        if size:   # counted by tenant_usage while the member ring lives (not as a channel)
            own = self.owner(rec.name) or self.segments.ownership(rec.token)
            if own is not None:
                self.owners[member.rec.name] = (member.rec, dataclasses.replace(
                    own, principal=client.tenant, size=size, member=True))
        return {"member": {"id": member.publisher, "shm": member.shm_name, "node": self.peer.node}}

    def op_unpublish(self, req: dict) -> dict:
        client = self._client(req)
        rec = self._channel(req)
        key = self._field(req, "key", int, optional=True, lo=0, hi=ID_MAX)
        self.registry.release_publisher(rec, client.id, key)
        return {}

    def op_members(self, req: dict) -> dict:
        """A subscriber of a multi-publisher channel saw the group epoch change: the member
        rings its slot reads now (spec/control.md)."""
        client = self._client(req)
        rec = self._channel(req)
        index = self._field(req, "slot", int, lo=0, hi=rec.max_subscribers - 1)
        slot = rec.slots.get(index) or rec.evicted.get(index)
        if slot is None or slot.client != client.id:
            raise InvalidArgument(f"channel {rec.name!r}: slot {index} is not yours")
        return {"epoch": rec.view.u32[ring.I_GROUP_EPOCH],
                "members": self.registry.members_for(rec, index)}

    def op_subscribe(self, req: dict) -> dict:
        client = self._client(req)
        rec = self._channel(req)
        self.authorize(client, "subscribe", rec.name, self.owner(rec.name))
        start = self._field(req, "start", str, optional=True) or "next"
        held = sum(1 for ch in self.registry.channels.values()
                   for table in (ch.slots, ch.evicted) for slot in table.values()
                   if self.tenants.get(slot.client) == client.tenant)
        self.quotas.check("subscribers", client.tenant, held)
        slot = self.registry.add_subscriber(rec, client.id, client.pid or client.claimed_pid, start)
        self.peer.on_subscribe(rec)  # a replica: ask its publishing node for a mirror
        for m in rec.members.values():
            if m.remote:   # another node's publisher of this group: its mirror is needed now
                self.peer.on_subscribe(m.rec)
        out = {"slot": slot.index, "generation": slot.generation, "seq": slot.seq,
               "position": rec.view.q[rec.view.slot_word(slot.index)]}
        if rec.group:
            out["epoch"] = rec.view.u32[ring.I_GROUP_EPOCH]
            out["members"] = self.registry.members_for(rec, slot.index)
        return out

    def op_unsubscribe(self, req: dict) -> dict:
        client = self._client(req)
        rec = self._channel(req)
        slot = self._field(req, "slot", int, lo=0, hi=rec.max_subscribers - 1)
        self.registry.remove_subscriber(rec, slot, client.id)
        return {}

    def op_list(self, req: dict) -> dict:
        channels, hidden = self._channels_for(req)
        return {"channels": channels, "hidden": hidden,
                "remote": self.peer.remote_channels(), "node": self.peer.node,
                "streams": self.streams.describe(self._visible(req)),
                "finished_streams": self.streams.finished_for(self._visible(req))}

    def op_stat(self, req: dict) -> dict:
        channels, hidden = self._channels_for(req)
        who = self._visible(req)
        clients = [c.describe() for c in self.sessions.clients.values()
                   if who is None or (who is not False and c.uid == who.uid)]
        return {"pid": os.getpid(), "uptime": time.time() - self.started,
                "socket": self.socket_path,
                "counters": {**self.counters, **self.sessions.counters,
                             **self.control.counters, **self.registry.counters,
                             **self.streams.counters},
                "shm_allocated": self.segments.allocated,
                "nofile": {"soft": self.nofile[0], "hard": self.nofile[1]},
                "orphans": len(self.orphans),
                "settings": {k: v for k, v in vars(self.settings).items() if k != "extra"},
                "clients": clients, "channels": channels, "hidden_channels": hidden,
                "peer": self.peer.describe(), "rdma": self._rdma_state(),
                "streams": self.streams.describe(who)}

    def _rdma_state(self) -> dict:
        """RDMA as it is: off (no peering), unavailable (and why), idle (a device, no mirror on
        it) or active (mirrors running over it)."""
        peer = self.peer
        if not peer.enabled:
            return {"state": "off", "why": "no peer_listen, peers or peer_dns set"}
        if peer.rdma_reason:
            return {"state": "unavailable", "why": peer.rdma_reason}
        on_rdma = sum(1 for e in peer.sources.values()
                      if e.source.describe()["transport"] == "rdma")
        if on_rdma:
            return {"state": "active", "why": f"{on_rdma} mirror(s) over RDMA"}
        return {"state": "idle", "why": "RDMA device found; no mirror uses it yet"}

    def op_delete(self, req: dict) -> dict:
        name = validate_name(req.get("name"))
        client = self._client(req)
        self._policy(client).check("publish", name)  # deleting is a publisher's act
        kind = req.get("kind")
        if kind not in (None, "channel", "stream"):
            raise InvalidArgument(f"delete kind must be 'channel' or 'stream', got {_show(kind)}")
        # Channels and streams have separate names; without a kind the channel goes first.
        if kind == "stream" or (kind is None and name not in self.registry.channels
                                and name in self.streams.streams):
            self.streams.delete(client, name)
            return {}
        if name in self.registry.channels:
            rec = self.registry.channels[name]
            if rec.group_of is not None:
                raise InvalidArgument(f"{name!r} is the ring of a publisher of channel "
                                      f"{rec.group_of.name!r}: delete that channel")
            self.access.check(self._caller(client), "delete", name, self.owner(name))
        self.registry.delete(name)
        self.owners.pop(name, None)
        return {}


def _show(value) -> str:
    """A request value for an error message, shortened (it came from anyone)."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def run(settings: Settings) -> None:
    logformat.configure(settings.log_level, settings.log_format)
    daemon = Daemon(settings)
    daemon.install_signal_handlers()
    daemon.run()
