"""The node daemon: one thread, one poll loop over the control socket and the session sockets.

The daemon is the control plane only.  It never touches message bytes on the local data path: it
creates and sizes rings, grants the publisher role and subscriber slots, watches liveness, reclaims
what dead clients held, and answers stats.  Any request, however malformed, gets an error reply
(a frame that is not one msgpack map also closes its connection: daemon/control.py) and the loop
goes on.

This module is the loop and what it owns: the lock that makes one daemon per socket, the
descriptor budget, the poll over every source of events, housekeeping each TICK, shutdown.  The
rooms it drives: ``dispatch`` (a request frame to a reply), ``operations`` (the channel and node
operations), ``callers`` (who asks, what they may), ``departures`` (clients leaving), and the
registry, sessions, streams, peer module and recorder; the one pass of its own is
``_remote_members`` (other nodes' publishers of our groups).  It must never answer a request
itself, and nothing it drives changes the daemon's books from another thread: the peer module's
and the Docker watcher's threads hand their events to this loop through the pipes it polls.
"""

from __future__ import annotations

import fcntl
import logging
import os
import resource
import select
import signal
import time

from shimmy.errors import ShimmyError
from shimmy.protocol import session_path

from . import logformat, metrics
from .access import AccessControl
from .callers import Callers
from .config import Settings
from .control import ControlListener
from .departures import Departures
from .dispatch import Dispatch
from .operations import Operations
from .quotas import Quotas, tenant
from .recordings import Recordings
from .records import alias_prefix
from .registry import Registry
from .segments import Segments
from .sessions import Sessions
from .setting_values import parse_mode, resolve_group
from .streams import StreamService

log = logging.getLogger("shimmy.daemon")
TICK = 0.1  # seconds between housekeeping passes (lease checks, idle channels)


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
        self.counters = {"requests": 0, "errors": 0, "malformed": 0, "clients_total": 0,
                         "clients_exited": 0, "clients_crashed": 0, "leases_expired": 0,
                         "slots_reclaimed": 0, "peer_tick_errors": 0,
                         "metrics_connections_refused": 0, "metrics_accept_errors": 0,
                         "metrics_connection_errors": 0}
        self._stop = False
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
        self.dispatch = Dispatch(self)
        self.control = ControlListener(self.socket_path, settings, tenant, self._prepare_socket,
                                       self._room, self.dispatch.handle)
        self.sessions = Sessions(session_path(self.socket_path), settings, tenant,
                                 self._prepare_socket, self._room)
        # Peering (docs/peering.md): own threads for sockets and data; registry changes arrive
        # here as events through a pipe this loop polls (PeerService.fds / on_readable).
        from .peer.service import PeerService
        self.peer = PeerService(self)
        # Recorded channels (docs/recording.md): the recorder process, numbering across restarts.
        self.recordings = Recordings(settings, self.socket_path)
        self.callers = Callers(self)         # who asks, what they may, whose is what
        self.departures = Departures(self)   # clients leaving, however they leave
        self.streams = StreamService(self)
        self.operations = Operations(self)
        self.dispatch.ops.update(self.operations.ops())
        self.dispatch.ops.update(self.streams.ops())
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
                orphans = self.departures.orphans
                for fd in orphans:
                    poller.register(fd, select.POLLIN)
                poller.register(self.departures.death_fd, select.POLLIN)
                peer_fds = self.peer.fds()
                for fd in peer_fds:
                    poller.register(fd, select.POLLIN)
                # Requests already buffered are answered without waiting (daemon/control.py).
                wait = 0 if self.control.ready else int(TICK * 1000)
                for fd, events in poller.poll(wait):
                    if fd in control:
                        self.control.on_event(fd, events)
                    elif fd == self.departures.death_fd:
                        self.departures.drain()
                    elif fd in peer_fds:
                        self.peer.on_readable(fd)
                    elif fd in orphans:
                        self.departures.exited(fd)
                    else:
                        for client in self.sessions.on_readable(fd):
                            self.departures.client_gone(client, crashed=not client.said_goodbye)
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
        self.recordings.stop()   # the recorder commits its last chunk before rings retire
        self.peer.shutdown()  # mirror threads stop reading rings before they are retired
        self.streams.close_all()
        self.registry.close_all()
        self.sessions.close()
        self.departures.close()
        self.control.close()
        for path in (self.socket_path, self.socket_path + ".lock"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        os.close(self._lock)
        log.info("daemon stopped")

    def _housekeeping(self, now: float) -> None:
        self.departures.expired(now)
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


def run(settings: Settings) -> None:
    logformat.configure(settings.log_level, settings.log_format)
    daemon = Daemon(settings)
    daemon.install_signal_handlers()
    daemon.run()
