"""``PeerService``: the daemon's peering, driven from the daemon's main loop plus a few threads.

Threads (all daemon threads, none touches the registry):

* acceptor: accepts on ``peer_listen``; each connection authenticates in its own short-lived
  thread (each bounded by ``peer_handshake_timeout``; at ``peer_max_pending`` pending, the
  oldest is cut), then that thread becomes the link's reader;
* one dialer per ``--peer``: connect, authenticate, read until the link dies, then reconnect with
  capped exponential backoff (``peer_backoff_initial`` doubling up to ``peer_backoff_max``);
* per link a writer (control messages, keepalives); per mirror source a sender;
* one credit thread reporting replica consumption back to sources.

The cluster directory (which node holds which name, in what role) is ``directory.py``; this
module acts on it: replicas, conversions, conflicts, continued streams.

Everything that changes the daemon's books (channels, slots, mirrors) runs on the main thread:
threads post events on a queue and write a byte to a pipe the main loop polls (``fds``,
``on_readable``); periodic work runs in ``tick``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import queue
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field

from shimmy import ring
from shimmy.errors import ChannelConflict, InvalidArgument, LimitExceeded, RingCorrupted

from shimmy.errors import PublisherBusy
from ..logformat import Throttle
from . import auth
from .directory import OPEN, PUBLISHED, REPLICA, BadAnnouncement, Directory, Entry, parse_entry
from .mirror import MirrorReplica, MirrorSource, ReplicaViolation, seed_stream
from .tcp import Link, LinkError, send_credit
from .transport import TransportClosed

log = logging.getLogger("shimmy.peer")

REPLICA_PUBLISHER = -1          # registry publisher id meaning "the daemon (peer module)"
_MIRROR_CLIENT_BASE = -1000     # registry client ids of mirror source slots: -1000, -1001, ...
CREDIT_STEP = 4                 # replicas credit their source in steps of capacity / 4
ANY_NODE = "*"                  # a held mirror slot for whichever replica asks first


def _ip_key(ip: str) -> tuple:
    """Sort key for addresses (numeric where possible) for the one-dialer-per-pair rule."""
    try:
        return (0, int(ipaddress.ip_address(ip)))
    except ValueError:
        return (1, ip)


def _interest(e: Entry | None) -> tuple | None:
    """What of a peer's entry decides whether this node holds a ring for it (a tail that moves
    does not)."""
    return None if e is None else (e.kind, e.subscribed, e.source, e.mode, e.capacity)


def parse_addr(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"peer address {text!r} must be HOST:PORT")
    return host.strip("[]"), int(port)


@dataclass
class SourceEntry:
    link: Link
    mid: int
    name: str
    client: int                 # registry client id holding the slot
    slot: int
    source: MirrorSource
    node: str


@dataclass
class HeldSlot:
    name: str
    client: int
    slot: int
    since: float
    interest: bool = False      # held for a peer's subscriber until its mirror asks (not a resume)
    at: tuple[int, int] | None = None   # (position, seq) where that peer's fresh replica stands


@dataclass
class ReplicaEntry:
    name: str
    node: str                   # publishing node
    sink: MirrorReplica
    state: str = "idle"         # idle | requested | streaming | failed
    link: Link | None = None
    mid: int = 0
    last_subscriber: float = field(default_factory=time.monotonic)
    retry_at: float = 0.0
    reconnects: int = 0
    streams: int = 0
    last_credit: int = -1
    converted: bool = False     # was a local channel waiting for a publisher (resume from 0)
    stream: int = 0             # the source stream this replica follows (0: none yet)


class PeerService:
    def __init__(self, daemon):
        self.d = daemon
        s = self.s = daemon.settings
        self.node = s.node or socket.gethostname()
        self.enabled = bool(s.peer_listen or s.peers or s.peer_dns)
        self.counters = {"auth_failures": 0, "protocol_errors": 0, "refused_sizes": 0,
                         "links_accepted": 0, "links_dialed": 0,
                         "reconnects": 0, "mirrors_served": 0, "mirrors_requested": 0,
                         "replica_resets": 0, "rdma_fallbacks": 0, "peers_discovered": 0,
                         "evicted_pending": 0, "duplicate_links": 0, "replicas_converted": 0,
                         "streams_continued": 0, "streams_carried": 0, "nodes_forgotten": 0,
                         "conflicts": 0, "accept_errors": 0}
        self._warn = Throttle(log).warning   # what a flood of connections repeats
        self.links: dict[int, Link] = {}
        self.directory = Directory()
        self.conflicts: dict[str, str] = {}     # channel name -> what conflicts (ls, logs)
        self.origins: dict[str, tuple[int, int]] = {}   # continued streams: where they began
        self.sources: dict[tuple[int, int], SourceEntry] = {}
        self.held: dict[tuple[str, str], HeldSlot] = {}
        self.replicas: dict[str, ReplicaEntry] = {}
        self.seen_nodes: set[str] = set()
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._credit_wake = threading.Event()   # set by replica commits
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._pending: dict[socket.socket, float] = {}    # unauthenticated connections
        self._pending_lock = threading.Lock()
        self._next_mid = 1
        self._next_client = _MIRROR_CLIENT_BASE
        self.listener: socket.socket | None = None
        self.listen_addr: str = ""
        from .rdma_mirrors import RdmaMirrors
        self.rdma = RdmaMirrors(self)       # transport choice per mirror (docs/rdma.md)
        self.transport_kind = s.transport
        self.rdma_reason = self.rdma.reason
        if not self.enabled:
            self._r = self._w = -1
            return
        self.key = auth.load_key(s.cluster_key_file)
        self.tls_server, self.tls_client = auth.tls_contexts(s.peer_tls_cert, s.peer_tls_key,
                                                             s.peer_tls_ca)
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        if s.peer_listen:
            host, port = parse_addr(s.peer_listen)
            self.listener = socket.create_server((host, port), reuse_port=False)
            self.listener.settimeout(0.25)
            self.listen_addr = "%s:%d" % self.listener.getsockname()[:2]
            self._spawn(self._accept_loop, "peer-accept")
            log.info("peer listening on %s node=%s", self.listen_addr, self.node)
        for addr in s.peers:
            self._spawn(self._dial_loop, f"peer-dial-{addr}", parse_addr(addr), addr)
        if s.peer_dns:
            self._spawn(self._discover_loop, "peer-dns", *parse_addr(s.peer_dns))
        self._spawn(self._credit_loop, "peer-credits")

    # -- plumbing --------------------------------------------------------------------------------
    def _spawn(self, target, name, *args) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def _post(self, *event) -> None:
        self._events.put(event)
        try:
            os.write(self._w, b"x")
        except (BlockingIOError, OSError):
            pass  # pipe full: the main loop is already due to drain

    def fds(self) -> list[int]:
        return [self._r] if self.enabled else []

    def on_readable(self, fd: int) -> None:
        try:
            while os.read(self._r, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            try:
                getattr(self, "_ev_" + event[0])(*event[1:])
            except Exception:
                log.exception("peer event %s failed", event[0])

    # -- connections (threads) ---------------------------------------------------------------------
    def _refused(self, who: str, exc: Exception, reason: str) -> None:
        if reason == "self":  # our own discovered address dialed us: expected, not an attack
            log.info("peer connection from %s is this daemon itself; closed", who)
            return
        if reason == "duplicate":  # both ends dial each other: one link is enough
            self.counters["duplicate_links"] += 1
            log.info("peer connection %s: %s; keeping the existing link", who, exc)
            return
        key = {"auth": "auth_failures", "size": "refused_sizes"}.get(reason, "protocol_errors")
        self.counters[key] += 1
        self._warn(key, "peer refused %s: %s: %s", who, reason, exc)

    def _prepare(self, sock: socket.socket, server: bool) -> socket.socket:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.s.peer_handshake_timeout)
        ctx = self.tls_server if server else self.tls_client
        if ctx is not None:
            sock = ctx.wrap_socket(sock, server_side=server)
        return sock

    def _accept_loop(self) -> None:
        listener = self.listener
        assert listener is not None
        while not self._stop.is_set():
            try:
                conn, addr = listener.accept()
            except socket.timeout:
                continue
            except OSError as exc:
                if self._stop.is_set() or listener.fileno() < 0:
                    return
                # EMFILE/ENFILE/ENOMEM: count, log (throttled), let handshakes finish and free
                # descriptors for accept_backoff, go on.
                self.counters["accept_errors"] += 1
                self._warn("accept", "peer accept failed: %s; pausing accepts for "
                           "accept_backoff=%.2fs", exc, self.s.accept_backoff)
                self._stop.wait(self.s.accept_backoff)
                continue
            who = "%s:%d" % addr[:2]
            self._admit(conn)
            self._spawn(self._serve_conn, f"peer-in-{who}", conn, who)

    def _admit(self, conn: socket.socket) -> None:
        """Count ``conn`` as a handshake in progress.  At ``peer_max_pending`` the oldest one is
        cut: a flood of connections that never speak keeps replacing itself, while a real peer
        (whose handshake takes milliseconds) is done long before it becomes the oldest."""
        with self._pending_lock:
            if len(self._pending) >= self.s.peer_max_pending:
                oldest = min(self._pending, key=self._pending.__getitem__)
                del self._pending[oldest]
                self.counters["evicted_pending"] += 1
                try:
                    oldest.shutdown(socket.SHUT_RDWR)   # its handshake thread fails at once
                except OSError:
                    pass
            self._pending[conn] = time.monotonic()

    def _handshake_done(self, conn: socket.socket) -> None:
        with self._pending_lock:
            self._pending.pop(conn, None)

    def _serve_conn(self, conn: socket.socket, who: str) -> None:
        try:
            sock = self._prepare(conn, server=True)
            remote = auth.accept_handshake(sock, self.key, self.node)
            self._check_remote(remote, dialed=False)
        except auth.PeerRefused as exc:
            self._handshake_done(conn)
            self._refused(who, exc, exc.reason)
            conn.close()
            return
        except (OSError, ValueError) as exc:
            evicted = conn not in self._pending
            self._handshake_done(conn)
            if evicted:
                self._warn("evicted", "peer connection %s cut: not authenticated when %d newer "
                           "connections were waiting (peer_max_pending)", who,
                           self.s.peer_max_pending)
            else:
                self._refused(who, exc if str(exc) else Exception(type(exc).__name__),
                              "protocol")
            conn.close()
            return
        self._handshake_done(conn)
        self.counters["links_accepted"] += 1
        self._run_link(sock, remote, who, dialed=False)

    def _check_remote(self, remote: str, dialed: bool) -> None:
        if remote == self.node:
            raise auth.PeerRefused("self", f"peer uses our own node name {remote!r}")
        if self._kept_link(remote) is not None and not self._preferred(remote, dialed):
            raise auth.PeerRefused("duplicate", f"already linked to {remote!r}")
        if len(self.links) >= self.s.peer_max_links:
            raise auth.PeerRefused("protocol", f"peer_max_links={self.s.peer_max_links} links up")

    def _preferred(self, remote: str, dialed: bool) -> bool:
        """Two daemons that dial each other keep one link: the one dialed by the node whose name
        sorts first.  Both ends decide alike, without a message."""
        dialer = self.node if dialed else remote
        return dialer == min(self.node, remote)

    def _kept_link(self, remote: str) -> Link | None:
        for lk in list(self.links.values()):
            if lk.remote == remote and not lk.closed:
                return lk
        return None

    def _discover_loop(self, name: str, port: int) -> None:
        """Peers from DNS: every address ``name`` resolves to (a Kubernetes headless Service
        lists one per daemon pod) is a peer.  Each pair of nodes needs one link, so a node dials
        only the addresses that sort above its own (``peer_listen`` host, else $POD_IP); with
        its own address unknown it dials every address and the handshake drops the self-link."""
        own = parse_addr(self.s.peer_listen)[0] if self.s.peer_listen else ""
        if own in ("", "0.0.0.0", "::"):
            own = os.environ.get("POD_IP", "")
        dialing: set[str] = set()
        while not self._stop.is_set():
            try:
                found = {str(ai[4][0])
                         for ai in socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)}
            except OSError as exc:
                log.warning("peer discovery: cannot resolve %s: %s", name, exc)
                found = set()
            for ip in sorted(found - dialing):
                if own and _ip_key(ip) <= _ip_key(own):
                    continue  # ourselves, or a peer that dials us
                dialing.add(ip)
                self.counters["peers_discovered"] += 1
                log.info("peer discovery: %s resolves to %s; dialing it", name, ip)
                self._spawn(self._dial_loop, f"peer-dial-{ip}", (ip, port), f"{ip}:{port}")
            if self._stop.wait(self.s.peer_dns_interval):
                return

    def _dial_loop(self, addr: tuple[str, int], text: str) -> None:
        backoff = self.s.peer_backoff_initial
        remote = ""     # node name at this address, once known
        while not self._stop.is_set():
            # Linked already through the other node's dial: wait while that link lives.
            while remote and self._kept_link(remote) is not None:
                if self._stop.wait(self.s.peer_backoff_max):
                    return
            sock = None
            try:
                sock = socket.create_connection(addr, timeout=self.s.peer_handshake_timeout)
                sock = self._prepare(sock, server=False)
                remote = auth.dial_handshake(sock, self.key, self.node)
                self._check_remote(remote, dialed=True)
                self.counters["links_dialed"] += 1
                backoff = self.s.peer_backoff_initial
                self._run_link(sock, remote, text, dialed=True)
            except auth.PeerRefused as exc:
                self._refused(text, exc, exc.reason)
                if exc.reason == "self":
                    return  # DNS discovery without a known own address found ourselves
                if exc.reason == "duplicate":
                    backoff = self.s.peer_backoff_initial
                    continue
            except OSError as exc:
                log.debug("peer %s unreachable: %s", text, exc)
            finally:
                if sock is not None:
                    try:
                        sock.close()
                    except OSError:
                        pass
            if self._stop.wait(backoff):
                return
            backoff = min(backoff * 2, self.s.peer_backoff_max)

    def _run_link(self, sock: socket.socket, remote: str, who: str, dialed: bool) -> None:
        sock.settimeout(self.s.peer_link_timeout)
        link = Link(sock, self.node, remote, who, dialed, self.s.peer_max_control_bytes,
                    self.s.peer_keepalive)
        self._post("link_up", link)
        try:
            link.run_reader(lambda lk, obj: self._post("ctrl", lk, obj),
                            self.s.peer_max_replica_capacity)
        except LinkError as exc:
            self._refused(f"{remote} ({who})", exc, exc.reason)
        except ReplicaViolation as exc:
            self._refused(f"{remote} ({who})", exc, "protocol")
        except (TransportClosed, OSError) as exc:
            log.info("peer link to %s (%s) down: %s", remote, who, exc or type(exc).__name__)
        finally:
            link.close()
            self._post("link_down", link)

    def _credit_loop(self) -> None:
        """Report each replica's consumed position to its source, in steps of a quarter of the
        ring (``CREDIT_STEP``): a credit for every message would cost a packet and a wake-up
        of the source's link reader per message (two per round trip).  A source then holds at
        most a quarter ring of bytes the replica has consumed, which leaves room for the
        largest message (half the ring), so a reliable publisher never waits on a credit not
        sent.  While a credit may come due (a quarter ring unconsumed past the last credit),
        poll every ``peer_credit_interval``; otherwise sleep until a replica commit brings one
        closer, or 0.25 s, after which the current position is repeated (so a credit the
        source could not apply never leaves a reliable publisher waiting)."""
        interval = self.s.peer_credit_interval
        refresh = False
        while not self._stop.is_set():
            self._credit_wake.clear()
            busy = False
            for entry in list(self.replicas.values()):
                link = entry.link
                if entry.state != "streaming" or link is None or link.closed:
                    continue
                step = entry.sink.cap // CREDIT_STEP
                c = entry.sink.consumed()
                if c - entry.last_credit >= step or refresh:
                    entry.last_credit = c
                    try:
                        send_credit(link, entry.mid, c, entry.sink.source_tail)
                    except TransportClosed:
                        pass
                if entry.sink.source_tail - entry.last_credit >= step:
                    busy = True
            if busy:
                self._stop.wait(interval)
                refresh = False
            else:
                refresh = not self._credit_wake.wait(0.25)

    # -- events (main thread) ----------------------------------------------------------------------
    def _ev_link_up(self, link: Link) -> None:
        if link.closed:
            return
        other = self._kept_link(link.remote)
        if other is not None:
            # Both ends dialed at once and both handshakes passed: keep the preferred link.
            keep_new = self._preferred(link.remote, link.dialed)
            drop = other if keep_new else link
            self.counters["duplicate_links"] += 1
            log.info("peer %s: two links (both ends dialed); keeping the one dialed by %s",
                     link.remote, min(self.node, link.remote))
            drop.close()
            if not keep_new:
                return
        self._announce()   # bring the others up to date first: the new link gets it all
        self.links[link.id] = link
        if link.remote in self.seen_nodes:
            self.counters["reconnects"] += 1
        self.seen_nodes.add(link.remote)
        self.directory.link_up(link.remote)
        log.info("peer link up: node=%s addr=%s %s", link.remote, link.addr,
                 "dialed" if link.dialed else "accepted")
        self._send_dir(link, full=True)
        self._request_mirrors()

    def _ev_link_down(self, link: Link) -> None:
        if self.links.pop(link.id, None) is None:
            return   # a duplicate we closed before it was ever used
        if self._kept_link(link.remote) is None:
            self.directory.link_down(link.remote, time.monotonic())
        for key, src in list(self.sources.items()):
            if src.link is link:
                self._stop_source(key, hold=True)
        for entry in self.replicas.values():
            if entry.link is link:
                self._detach_replica(entry, reconnect=True)

    def _ev_ctrl(self, link: Link, obj: dict) -> None:
        if link.id not in self.links:
            return
        handler = getattr(self, "_ctrl_" + obj["t"], None)
        if handler is None:
            self._violation(link, f"unknown control message {obj['t']!r}")
            return
        try:
            handler(link, obj)
        except (KeyError, TypeError, ValueError) as exc:
            self._violation(link, f"malformed {obj['t']!r} message: {type(exc).__name__}: {exc}")

    def _violation(self, link: Link, message: str, reason: str = "protocol") -> None:
        self._refused(f"{link.remote} ({link.addr})", Exception(message), reason)
        link.close()

    # -- control messages --------------------------------------------------------------------------
    def _ctrl_dir(self, link: Link, obj: dict) -> None:
        channels = {}
        raw = obj["channels"]
        gone = obj.get("gone", [])
        if not isinstance(raw, dict) or not isinstance(gone, list) or \
                not all(isinstance(n, str) for n in gone):
            raise BadAnnouncement("directory must be a map of entries and a list of names")
        for name, value in raw.items():
            e = parse_entry(name, value)
            if e.capacity > self.s.peer_max_replica_capacity or e.capacity < ring.MIN_CAPACITY \
                    or e.capacity & (e.capacity - 1):
                self.counters["refused_sizes"] += 1
                log.warning("peer %s announced channel %r with capacity %d outside "
                            "[%d, peer_max_replica_capacity=%d]: not mirrorable", link.remote,
                            name, e.capacity, ring.MIN_CAPACITY, self.s.peer_max_replica_capacity)
                continue
            channels[name] = e
        known = self.directory.nodes.get(link.remote, {})
        touched = set(known) if obj.get("full") else set(channels) | set(gone)
        before = {n: _interest(known.get(n)) for n in touched}
        self.directory.apply(link.remote, bool(obj.get("full")), channels, gone)
        self._reconcile()
        known = self.directory.nodes.get(link.remote, {})
        for name in touched | set(channels):
            if before.get(name) != _interest(known.get(name)):
                self._follow_interest(name)
        self._request_mirrors()

    def _send_dir(self, link: Link, full: bool, changed: dict | None = None,
                  gone: list | None = None) -> None:
        entries = self.directory.announced() if full else (changed or {})
        link.send_ctrl({"t": "dir", "node": self.node, "full": full,
                        "channels": {n: e.wire() for n, e in entries.items()},
                        "gone": [] if full else (gone or [])})

    def _ctrl_mirror(self, link: Link, obj: dict) -> None:
        """Source side: a peer wants a mirror of one of our channels."""
        mid, name = int(obj["id"]), str(obj["name"])
        resume = obj.get("resume")
        consumed = obj.get("consumed")
        rec = self.d.registry.channels.get(name)
        if rec is None or name in self.replicas or \
                (rec.publisher is None and rec.view.q[ring.OFF_TAIL // 8] == 0):
            # (Only open here, nothing published: a peer asking from what it knew before this
            # daemon restarted.  Serving it would name a stream before the publisher says which
            # one it carries over; it asks again once we announce the channel published.)
            link.send_ctrl({"t": "mirror_err", "id": mid,
                            "message": f"channel {name!r} is not published on {self.node}"})
            return
        if (link.id, mid) in self.sources:
            self._stop_source((link.id, mid), hold=False)
        q = rec.view.q
        held = self.held.pop((link.remote, name), None) or self.held.pop((ANY_NODE, name), None)
        try:
            if held is not None and held.slot in rec.slots:
                client, slot = held.client, held.slot
            else:
                if held is not None:
                    self._free_slot(rec, held.client, held.slot)
                client = self._next_client
                self._next_client -= 1
                slot = self.d.registry.add_subscriber(rec, client, os.getpid(), "next").index
        except LimitExceeded as exc:
            link.send_ctrl({"t": "mirror_err", "id": mid, "message": str(exc)})
            return
        rec.holders.add(client)
        rec.idle_since = None
        head, tail = q[ring.OFF_HEAD // 8], q[ring.OFF_TAIL // 8]
        start_seq = None
        sid = self._stream_id(rec)
        rseq = obj.get("seq")
        if isinstance(resume, int) and resume >= 0 and obj.get("stream") not in (sid, 0):
            # The replica follows another stream of this name (this daemon restarted and its
            # ring began again): positions do not match even where they look alike.
            resume = tail + 1
        ahead = isinstance(resume, int) and resume > tail
        wait_seq = None
        fresh_at = held.at if held is not None and resume == -1 else None
        if fresh_at is not None and head <= fresh_at[0] <= tail and \
                obj.get("stream") in (sid, 0):
            # A fresh replica whose subscribers' interest we held for: it starts where it was
            # positioned (where its subscribers start), not at our tail, which has moved on
            # since (docs/peering.md, "Interest").
            resume_pos: int | None = None
            start, start_seq = fresh_at
        elif ahead and obj.get("stream") == sid and isinstance(rseq, int) and rseq >= 0:
            # Our stream, numbered on from the replica's, but at other positions than its
            # copy (a publisher carried it over from a ring whose last positions the replica
            # held, Channel.reopen; it may still be carrying): resume by sequence number, at
            # the first message numbered ``rseq`` or later, once the ring has it (the source
            # thread waits); a gap (messages no longer held) is then exact.
            resume_pos = resume
            start, wait_seq = tail, rseq
            ahead = False
            log.info("mirror %s to %s: replica ahead by position (%d, our tail %d): resuming at "
                     "seq %d", name, link.remote, resume, tail, rseq)
        elif not isinstance(resume, int) or resume < 0 or resume > tail:
            resume_pos = None if not isinstance(resume, int) or resume < 0 else resume
            # A fresh replica starts at our tail; one ahead of our stream (this daemon
            # restarted, the stream began again) has none of it: it gets all we still hold.
            start, start_seq = ring.stream_point(rec.view, oldest=resume_pos is not None)
            if resume_pos is not None:
                log.warning("mirror %s to %s: replica at %d is ahead of our tail %d (our stream "
                            "restarted): it continues with our oldest message at %d", name,
                            link.remote, resume, tail, start)
        elif resume < head:
            resume_pos = resume
            start, start_seq = ring.stream_point(rec.view, oldest=True)
            log.warning("mirror %s to %s: replica resumes at %d but we hold only from %d: gap",
                        name, link.remote, resume, start)
        else:
            resume_pos = start = resume
        hold_at = start
        if isinstance(consumed, int) and resume_pos is not None and not ahead and \
                0 <= consumed <= start:
            hold_at = consumed
        # SYNC POINT: the mirror's slot position; reliable publishers keep everything from here.
        q[rec.view.slot_word(slot)] = hold_at
        transport = self.rdma.source_transport(link, mid, rec, obj.get("rdma"))
        origin = self.origins.get(name, (0, 0)) if ahead else None
        src = MirrorSource(name, rec.view, slot, self.d.registry.sem_prefix_of(rec) + str(slot),
                           transport, start, start_seq, resume_pos, origin, wait_seq)
        src.credit = hold_at
        self.sources[(link.id, mid)] = SourceEntry(link, mid, name, client, slot, src, link.remote)
        self.counters["mirrors_served"] += 1
        link.send_ctrl({"t": "mirror_ok", "id": mid, "start": start,
                        "mode": ring.MODE_NAMES[rec.mode], "capacity": rec.capacity,
                        "transport": transport.kind, "stream": sid})
        log.info("mirror %s -> %s: start=%d resume=%s transport=%s", name, link.remote, start,
                 resume, transport.kind)
        src.start()

    def _ctrl_rdma(self, link: Link, obj: dict) -> None:
        self.rdma.on_ctrl(link, obj)

    def _ev_rdma(self, name: str, mid: int, reason: str) -> None:
        self.rdma.on_event(name, mid, reason)

    def _ctrl_unmirror(self, link: Link, obj: dict) -> None:
        key = (link.id, int(obj["id"]))
        if key in self.sources:
            self._stop_source(key, hold=False)

    def _ctrl_mirror_ok(self, link: Link, obj: dict) -> None:
        mid = int(obj["id"])
        for entry in self.replicas.values():
            if entry.link is link and entry.mid == mid and entry.state == "requested":
                entry.state = "streaming"
                entry.streams += 1
                if isinstance(obj.get("stream"), int):
                    entry.stream = obj["stream"]
                entry.sink.set_link(ring.LINK_UP)
                log.info("replica %s streaming from %s (start=%s)", entry.name, link.remote,
                         obj.get("start"))

    def _ctrl_mirror_err(self, link: Link, obj: dict) -> None:
        mid = int(obj["id"])
        for entry in self.replicas.values():
            if entry.link is link and entry.mid == mid:
                log.warning("replica %s: %s refused the mirror: %s", entry.name, link.remote,
                            obj.get("message"))
                self._detach_replica(entry, reconnect=True)
                entry.retry_at = time.monotonic() + self.s.peer_backoff_max

    # -- source side helpers -----------------------------------------------------------------------
    def _stop_source(self, key, hold: bool) -> None:
        entry = self.sources.pop(key)
        entry.source.stop()
        entry.source.t.close()
        rec = self.d.registry.channels.get(entry.name)
        if rec is None:
            return
        if hold and rec.mode == ring.MODE_RELIABLE and self.s.peer_hold > 0:
            # Keep the slot (and so the unconsumed bytes) for peer_hold seconds: a reconnect
            # within that resumes with nothing lost.
            self.held[(entry.node, entry.name)] = HeldSlot(entry.name, entry.client, entry.slot,
                                                           time.monotonic())
            rec.view.q[rec.view.slot_word(entry.slot)] = entry.source.credit
        else:
            self._free_slot(rec, entry.client, entry.slot)

    def _free_slot(self, rec, client: int, slot: int) -> None:
        try:
            self.d.registry.remove_subscriber(rec, slot, client)
        except InvalidArgument:
            pass
        rec.holders.discard(client)
        if not rec.holders and rec.idle_since is None:
            rec.idle_since = time.monotonic()

    # -- replica side ------------------------------------------------------------------------------
    def find_publisher(self, name: str) -> tuple[Link | None, Entry | None]:
        """The live link to the node that publishes ``name`` (the first by node name when two
        published it before they heard of each other) and its announcement."""
        for node, entry in self.directory.publishers(name):
            link = self._kept_link(node)
            if link is not None:
                return link, entry
        return None, None

    def check_publish(self, rec) -> None:
        """Before granting the publisher role: one publisher per channel, cluster-wide."""
        entry = self.replicas.get(rec.name)
        if entry is not None:
            raise PublisherBusy(f"channel {rec.name!r} is published on node {entry.node!r}; one "
                                f"publisher per channel across the cluster: publish there, or "
                                f"on another channel")
        if self.enabled and rec.publisher is None and not rec.group:
            # The publisher about to be granted may fill the ring before any peer's mirror
            # asks: hold it for the peers with a subscriber waiting (as hold_member does for
            # a publisher group's new member ring).
            self._hold_for_interest(rec, rec.name)

    def _shape_conflict(self, name: str, node: str, e: Entry, mode, capacity) -> str | None:
        if mode is not None and mode != e.mode:
            return (f"channel {name!r} is published on node {node!r} with "
                    f"mode={ring.MODE_NAMES[e.mode]!r}; here mode={ring.MODE_NAMES[mode]!r}")
        if capacity is not None and capacity != e.capacity:
            return (f"channel {name!r} is published on node {node!r} with capacity={e.capacity}; "
                    f"here capacity={capacity}")
        return None

    def _make_replica(self, name: str, node: str, rec, converted: bool, stream: int) -> None:
        rec.publisher = REPLICA_PUBLISHER
        sink = MirrorReplica(rec.view, self.d.registry.sem_prefix_of(rec))
        sink.set_link(ring.LINK_DOWN)
        entry = self.replicas[name] = ReplicaEntry(name, node, sink, converted=converted,
                                                   stream=stream)
        step = rec.capacity // CREDIT_STEP
        wake = self._credit_wake.set

        def on_commit() -> None:   # link reader thread, after each replica commit
            if sink.source_tail - entry.last_credit >= step:
                wake()   # a credit may come due: the credit loop starts polling
        sink.on_commit = on_commit
        if converted:
            # Subscribers here were waiting before the publisher existed: they get the source's
            # stream from its start (or from its oldest message still held, the gap counted).
            sink.fed = True
            self.counters["replicas_converted"] += 1
        sink.wakeups.post_all()

    def prepare_open(self, name: str, mode: str | None, capacity: int | None) -> None:
        """Before ``op_open`` of a channel this node lacks: make it a replica if a peer
        publishes it (same mode and capacity as the source); or, if peers hold replicas of it
        fed by this node (our daemon restarted), continue their stream."""
        if not self.enabled or name in self.d.registry.channels:
            return
        link, info = self.find_publisher(name)
        if link is None or info is None:
            self._continue_stream(name, mode, capacity)
            if name not in self.d.registry.channels:
                self._adopt_shape(name, mode, capacity)
            return
        want_mode = None if mode is None else ring.MODES.get(mode)
        conflict = self._shape_conflict(name, link.remote, info, want_mode, capacity)
        if conflict:
            raise ChannelConflict(conflict)
        if len(self.replicas) >= self.s.peer_max_replicas:
            raise LimitExceeded(f"cannot mirror {name!r}: peer_max_replicas "
                                f"({self.s.peer_max_replicas}) replicas exist")
        if info.capacity > self.s.max_capacity:
            raise LimitExceeded(f"cannot mirror {name!r}: its capacity {info.capacity} exceeds "
                                f"this node's max_capacity {self.s.max_capacity}")
        rec = self.d.registry._create(name, ring.MODE_NAMES[info.mode], info.capacity)
        self._make_replica(name, link.remote, rec, converted=False, stream=info.stream)
        # Position the replica at the source's tail as last announced, before any subscriber
        # can attach: "next" subscribers then start there with the exact sequence number, and
        # the mirror resumes from it (or reports the gap if the source no longer holds it).
        self.replicas[name].sink.jump(info.tail, info.seq)
        log.info("channel %s is published on %s: created replica", name, link.remote)

    def announced_group(self, name: str) -> tuple[str, int, int] | None:
        """``(mode, capacity, max_publishers)`` of ``name`` where a peer announces it as a
        publisher group (the first such node by name), else None: an open that does not state
        max_publishers takes that shape, so subscribers need not know how many publishers a
        channel has, or where (spec/ring.md, "Publisher groups")."""
        for _, e in sorted(self.directory.names().get(name, []), key=lambda ne: ne[0]):
            if e.publishers > 1 and e.kind != REPLICA:
                return ring.MODE_NAMES[e.mode], e.capacity, e.publishers
        return None

    def published_elsewhere(self) -> dict[str, str]:
        """Every name a peer announces as published, with that node (the first by name); a
        node whose link is down is included until it is forgotten (its replicas here resume
        where they stopped when it comes back)."""
        out: dict[str, str] = {}
        for name, holders in self.directory.names().items():
            for node, e in holders:
                if e.kind == PUBLISHED:
                    out.setdefault(name, node)
        return out

    def replicate(self, name: str, node: str) -> None:
        """Make the replica of ``name`` (published on ``node``), fed from the start of the
        source's stream: the ring of another node's publisher of one of our publisher groups
        (registry.join_remote; spec/ring.md, "Publisher groups")."""
        link, info = self.find_publisher(name)
        if link is None or info is None or link.remote != node:
            return
        if len(self.replicas) >= self.s.peer_max_replicas:
            raise LimitExceeded(f"cannot mirror {name!r}: peer_max_replicas "
                                f"({self.s.peer_max_replicas}) replicas exist")
        rec = self.d.registry._create(name, ring.MODE_NAMES[info.mode], info.capacity)
        self._make_replica(name, node, rec, converted=False, stream=info.stream)
        self.replicas[name].sink.fed = True   # resume at our tail, 0: the source's first message

    def _adopt_shape(self, name: str, mode: str | None, capacity: int | None) -> None:
        """Peers hold ``name`` open but nobody publishes it yet: where the opener left mode or
        capacity to the channel, take them from the peers' announcements, so this channel can
        become the replica when a publisher there starts (a default-capacity channel would be a
        conflict with a publisher that opened it with another capacity).  When peers announce
        several shapes, the ones other than this node's defaults were asked for explicitly; if
        that still leaves more than one, nothing is adopted (the conflict is then reported)."""
        want = None if mode is None else ring.MODES.get(mode)
        default = (ring.MODE_RELIABLE, self.s.default_capacity)
        shapes = {(e.mode, e.capacity) for _, e in self.directory.names().get(name, [])
                  if e.kind == OPEN and want in (None, e.mode) and capacity in (None, e.capacity)}
        if len(shapes) > 1:
            shapes.discard(default)
        if len(shapes) != 1:
            return
        ((m, cap),) = shapes
        if (want, capacity) == (m, cap) or (m, cap) == default or cap > self.s.max_capacity:
            return   # nothing to adopt (or too large here: the registry names the limit)
        self.d.registry._create(name, ring.MODE_NAMES[m], cap)
        log.info("channel %s: opened on peers as mode=%s capacity=%d before anyone publishes "
                 "it; created with that shape", name, ring.MODE_NAMES[m], cap)

    def _continue_stream(self, name: str, mode: str | None, capacity: int | None) -> None:
        """Peers hold replicas of ``name`` fed by this node before it restarted: create the
        ring positioned where the furthest replica ends, with its next sequence number, so the
        replicas (and their subscribers) continue the stream instead of being retired."""
        held = self.directory.replicas_of(name, self.node)
        if not held:
            return
        node, e = max(held, key=lambda ne: ne[1].tail)
        want_mode = None if mode is None else ring.MODES.get(mode)
        if self._shape_conflict(name, node, e, want_mode, capacity) or \
                e.capacity > self.s.max_capacity or e.tail < ring.HEADER or e.seq < 1:
            return   # a different channel now: the replicas will see a conflict
        rec = self.d.registry._create(name, ring.MODE_NAMES[e.mode], e.capacity)
        seed_stream(rec.view, e.tail, e.seq)
        self.origins[name] = (e.tail, e.seq)
        rec.view.q[ring.OFF_STREAM // 8] = e.stream   # the same stream, continued
        self._hold(rec, [rnode for rnode, _ in held])
        self.counters["streams_continued"] += 1
        log.info("channel %s: node %s holds its replica up to position %d (seq %d) from before "
                 "this daemon restarted; continuing the stream there", name, node, e.tail, e.seq)

    def _hold(self, rec, nodes: list[str], start: str = "next", interest: bool = False) -> None:
        """Hold the stream from the ring's tail (``start="oldest"``: from the oldest message it
        still holds) for each of ``nodes`` (``ANY_NODE``: the first replica to ask) until its
        mirror request arrives (as for a reconnect, bounded by peer_hold): a reliable publisher
        that starts at once must not overwrite what the replicas have not received yet."""
        for rnode in nodes:
            try:
                client = self._next_client
                slot = self.d.registry.add_subscriber(rec, client, os.getpid(), start).index
            except LimitExceeded:
                break
            self._next_client -= 1
            rec.holders.add(client)
            self.held[(rnode, rec.name)] = HeldSlot(rec.name, client, slot, time.monotonic(),
                                                    interest)

    def _follow_interest(self, name: str) -> None:
        """A peer's announcement of ``name`` changed: hold the rings this node publishes under
        that name (a publisher group's local member rings, for the group's name) for the peers
        now interested, and release the holds of those no longer interested."""
        rec = self.d.registry.channels.get(name)
        if rec is None or name in self.replicas:
            return
        if rec.group:
            for m in list(rec.members.values()):
                if not m.remote and m.client is not None:
                    self._hold_for_interest(m.rec, name)
        elif rec.group_of is None and rec.publisher is not None:
            self._hold_for_interest(rec, name)

    def _hold_for_interest(self, rec, interest: str) -> None:
        """Hold the reliable ring ``rec`` (published here, or about to be) for every peer with a
        subscriber of ``interest`` (the channel's name; a member ring's group) that no mirror
        serves yet, until that peer's mirror asks, at most ``peer_hold``; release the holds of
        peers whose subscribers left before asking (docs/peering.md, "Interest").  A peer whose
        channel is still local (it converts to the replica and resumes at the stream's first
        message) is held from the oldest message the ring holds, one with a replica from the
        tail (its mirror starts there).  Lossy rings never hold: their mirrors count gaps."""
        if rec.mode != ring.MODE_RELIABLE or rec.name in self.replicas:
            return
        holders = self.directory.holders(interest)
        member = rec.group_of is not None
        # Only nodes whose channel will take this ring's stream (same mode; the same capacity,
        # or a group for a group's member ring): one in conflict never asks.
        nodes = [n for n in self.directory.interested(interest, self.node)
                 if holders[n].mode == rec.mode and (holders[n].publishers > 1 if member else
                                                     holders[n].publishers == 1 and
                                                     holders[n].capacity == rec.capacity)]
        for key, held in list(self.held.items()):
            if key[1] == rec.name and held.interest and key[0] not in nodes and \
                    key[0] not in self.directory.down_since:
                del self.held[key]    # its subscribers left before its mirror asked
                self._free_slot(rec, held.client, held.slot)
        if self.s.peer_hold <= 0 or (ANY_NODE, rec.name) in self.held:
            return
        served = {e.node for e in self.sources.values() if e.name == rec.name}
        head, tail = rec.view.q[ring.OFF_HEAD // 8], rec.view.q[ring.OFF_TAIL // 8]
        for node in nodes:
            if (node, rec.name) in self.held or node in served:
                continue
            e = holders[node]
            if e.kind == OPEN:
                self._hold(rec, [node], "oldest", interest=True)
                continue
            self._hold(rec, [node], "next", interest=True)
            h = self.held.get((node, rec.name))
            if h is not None and e.stream == self._stream_id(rec) and head <= e.tail <= tail:
                # Its replica stands at our tail as we announced it: hold from there (a frame
                # boundary we still hold) and start its mirror there.  Moving the slot back
                # races with a publisher passing it, as any "oldest" subscriber does: the
                # mirror reads the head again, so the worst case is a counted gap.
                rec.view.q[rec.view.slot_word(h.slot)] = e.tail
                h.at = (e.tail, e.seq)

    def hold_member(self, group: str, mrec) -> None:
        """A publisher joined the publisher group ``group`` here: hold its new member ring from
        its first message for every peer with a subscriber of ``group``.  Their daemons make the
        member's replica once our directory announces it (a housekeeping tick later); until
        their mirror asks, the held slot keeps a reliable publisher from overwriting what they
        have not received (bounded by peer_hold, as for a reconnect).  Lossy publishers never
        wait: a late mirror counts the gap."""
        if self.enabled:
            self._hold_for_interest(mrec, group)

    def carry(self, rec, carry: dict) -> None:
        """The new publisher carries its stream over from its ring of this node's previous
        daemon (``Channel.reopen`` after a restart, a SIGKILL included): ``carry`` names that
        stream, the position of the oldest message it still holds and that message's sequence
        number.  An empty ring is positioned there (``seed_stream``) with the stream's id, so
        the messages the publisher publishes again land at their old positions and replicas
        that hold a prefix of them resume by position; the stream is held for the replicas
        (``_hold``).  A ring that already holds a stream (continued from replicas' positions,
        or published since) is left as it is: the publisher skips what it numbers already."""
        vals = [carry.get(k) for k in ("stream", "position", "seq")]
        ints = [x for x in vals if isinstance(x, int) and not isinstance(x, bool)
                and 0 <= x < 1 << 64]
        if len(ints) != 3 or ints[1] & 15:
            raise InvalidArgument("field 'carry' must map stream, position (a multiple of 16) "
                                  "and seq to non-negative 64-bit integers")
        stream, position, seq = ints
        view = rec.view
        if rec.name in self.replicas or view.q[ring.OFF_TAIL // 8] != 0:
            return
        if stream:
            view.q[ring.OFF_STREAM // 8] = stream
        if position >= ring.HEADER:
            # The daemon holds the publisher role's words here: the client it granted the role
            # to builds its RingWriter only after this reply (spec/ring.md, "Carried
            # streams").
            seed_stream(view, position, seq)
            self.origins[rec.name] = (position, seq)
            for (_, name), held in self.held.items():
                if name == rec.name:   # held for a peer's subscriber (check_publish), at 0
                    view.q[view.slot_word(held.slot)] = position
        if self.enabled:
            nodes = [n for n, _ in self.directory.replicas_of(rec.name, self.node)]
            if not nodes and not any(k[1] == rec.name for k in self.held):
                nodes = [ANY_NODE]
            self._hold(rec, [n for n in nodes if (n, rec.name) not in self.held])
        self.counters["streams_carried"] += 1
        log.info("channel %s: its publisher carries its stream over from before this daemon "
                 "restarted: position %d, seq %d", rec.name, position, seq)

    def _reconcile(self) -> None:
        """Local channels that wait for a publisher which now exists on a peer become replicas
        (same mode and capacity); anything else that does not fit is a conflict, reported in
        the logs, in ``ls`` and (for waiting subscribers) in ``Subscription.status``."""
        found: dict[str, str] = {}
        for name, rec in self.d.registry.channels.items():
            pubs = self.directory.publishers(name)
            if not pubs or name in self.replicas:
                continue
            if getattr(rec, "group", False):
                # A multi-publisher channel (its members mirror one by one) is never turned
                # into a replica of a single-publisher channel elsewhere.
                found[name] = (f"channel {name!r} is a multi-publisher channel on this node "
                               f"and a single-publisher channel published on node "
                               f"{pubs[0][0]!r}: their messages do not meet")
                continue
            local_pub = rec.publisher is not None or rec.view.q[ring.OFF_TAIL // 8] != 0
            if local_pub:
                found[name] = (f"channel {name!r} has publishers on this node and on node "
                               f"{pubs[0][0]!r} (one publisher per channel): their messages do "
                               f"not meet")
                continue
            node, e = pubs[0]
            conflict = self._shape_conflict(name, node, e, rec.mode, rec.capacity)
            if conflict:
                found[name] = conflict + ": this node's subscribers receive nothing from it"
                rec.view.u32[ring.OFF_LINK // 4] = ring.LINK_CONFLICT
                continue
            if len(self.replicas) >= self.s.peer_max_replicas:
                found[name] = (f"channel {name!r} is published on node {node!r} but "
                               f"peer_max_replicas ({self.s.peer_max_replicas}) replicas exist")
                continue
            self._make_replica(name, node, rec, converted=True, stream=e.stream)
            log.info("channel %s: publisher appeared on node %s; the local channel is now its "
                     "replica", name, node)
        for name, text in found.items():
            if self.conflicts.get(name) != text:
                self.counters["conflicts"] += 1
                log.warning("peer conflict: %s", text)
        for name in self.conflicts.keys() - found.keys():
            rec = self.d.registry.channels.get(name)
            if rec is not None and rec.view.u32[ring.OFF_LINK // 4] == ring.LINK_CONFLICT:
                rec.view.u32[ring.OFF_LINK // 4] = ring.LINK_LOCAL
        self.conflicts = found

    def on_subscribe(self, rec) -> None:
        if not self.enabled:
            return
        entry = self.replicas.get(rec.name)
        if entry is not None:
            entry.last_subscriber = time.monotonic()
            if entry.state in ("idle", "failed"):
                self._request_mirrors()
        # Interest is announced at once, not at the next tick: the publishing node holds its
        # ring for this subscriber from the moment it hears of it (docs/peering.md, "Interest").
        e = self._entry(rec.name, rec)
        if e is not None and self.directory.note(rec.name, e):
            for link in self.links.values():
                self._send_dir(link, full=False, changed={rec.name: e})

    def _request_mirrors(self) -> None:
        now = time.monotonic()
        for entry in self.replicas.values():
            if entry.state not in ("idle", "failed") or entry.retry_at > now:
                continue
            rec = self.d.registry.channels.get(entry.name)
            if rec is None or not rec.slots:
                continue
            link, _ = self.find_publisher(entry.name)
            if link is None:
                continue
            mid = self._next_mid
            self._next_mid += 1
            entry.link, entry.mid, entry.state = link, mid, "requested"
            entry.node = link.remote
            entry.last_credit = -1
            sink = entry.sink
            # (a put of an earlier mirror that was never committed is dropped by the sink
            # itself, in the link reader's order: MirrorReplica.put_target / jump)
            link.sinks[mid] = sink
            link.send_ctrl({"t": "mirror", "id": mid, "name": entry.name, "stream": entry.stream,
                            "resume": sink.source_tail if sink.fed else -1,
                            "seq": sink.source_seq if sink.fed else -1,
                            "consumed": sink.consumed() if sink.fed else -1,
                            "rdma": self.rdma.offer(entry, rec)})
            self.counters["mirrors_requested"] += 1

    def _detach_replica(self, entry: ReplicaEntry, reconnect: bool) -> None:
        self.rdma.release(entry.name)
        if entry.link is not None:
            entry.link.sinks.pop(entry.mid, None)
        if entry.state == "streaming" and reconnect:
            entry.reconnects += 1
        entry.link = None
        entry.state = "idle"
        entry.sink.set_link(ring.LINK_DOWN, bump=reconnect)
        entry.sink.wakeups.post_all()   # subscribers re-read the link state

    def is_replica(self, name: str) -> bool:
        return name in self.replicas

    # -- periodic ----------------------------------------------------------------------------------
    def _announce(self) -> None:
        changed, gone = self.directory.delta(self._local_directory())
        if changed or gone:
            for link in self.links.values():
                self._send_dir(link, full=False, changed=changed, gone=gone)

    def tick(self, now: float) -> None:
        if not self.enabled:
            return
        self._announce()
        for name in self.origins.keys() - self.d.registry.channels.keys():
            del self.origins[name]   # deleted: a new channel of that name starts at 0
        for node in self.directory.expired(now, self.s.peer_forget_after):
            self._forget_node(node)
        self._reconcile()
        for key, src in list(self.sources.items()):
            if src.source.stopped:
                self._stop_source(key, hold=True)
        for k, held in list(self.held.items()):
            if now - held.since > self.s.peer_hold:
                rec = self.d.registry.channels.get(held.name)
                log.warning("mirror %s to %s: no %s within peer_hold=%.1fs; releasing "
                            "its data (a later resume reports a gap)", held.name, k[0],
                            "mirror request" if held.interest else "reconnect", self.s.peer_hold)
                del self.held[k]
                if rec is not None:
                    self._free_slot(rec, held.client, held.slot)
        for name, entry in list(self.replicas.items()):
            rec = self.d.registry.channels.get(name)
            if rec is None:  # deleted (idle ttl, rm): forget it
                self._forget_replica(entry)
                continue
            if entry.sink.reset_needed:
                self.counters["replica_resets"] += 1
                log.warning("replica %s: source %s restarted its stream below ours; retiring "
                            "the replica (subscribers reopen)", name, entry.node)
                self._forget_replica(entry)
                self.d.registry.delete(name)
                continue
            if rec.slots:
                entry.last_subscriber = now
            elif entry.state in ("requested", "streaming") and \
                    now - entry.last_subscriber >= self.s.peer_unmirror_grace:
                log.info("replica %s: last subscriber left; stopping the mirror", name)
                if entry.link is not None:
                    entry.link.send_ctrl({"t": "unmirror", "id": entry.mid})
                self._detach_replica(entry, reconnect=False)
        self._request_mirrors()

    def _forget_node(self, node: str) -> None:
        """``node`` had no link for ``peer_forget_after``: it left the cluster.  Its replicas
        here become plain local channels (subscribers keep them; a new publisher anywhere takes
        the channel over), and its held mirror slots are released."""
        self.counters["nodes_forgotten"] += 1
        self.seen_nodes.discard(node)
        log.warning("peer %s: no link for peer_forget_after=%.1fs; forgetting it", node,
                    self.s.peer_forget_after)
        for name, entry in list(self.replicas.items()):
            if entry.node == node and entry.link is None:
                rec = self.d.registry.channels.get(name)
                del self.replicas[name]
                if rec is not None:
                    rec.publisher = None
                    rec.view.u32[ring.OFF_LINK // 4] = ring.LINK_LOCAL
                entry.sink.wakeups.post_all()   # subscribers re-read the link state
                entry.sink.close()
        for k in [k for k in self.held if k[0] == node]:
            held = self.held.pop(k)
            rec = self.d.registry.channels.get(held.name)
            if rec is not None:
                self._free_slot(rec, held.client, held.slot)

    def _forget_replica(self, entry: ReplicaEntry) -> None:
        self.rdma.release(entry.name)
        if entry.link is not None:
            entry.link.sinks.pop(entry.mid, None)
            entry.link.send_ctrl({"t": "unmirror", "id": entry.mid})
        entry.sink.close()
        self.replicas.pop(entry.name, None)

    def _stream_id(self, rec) -> int:
        """The id of the stream ``rec``'s ring holds: new per ring this node creates (random,
        never 0), kept by a ring that continues a stream after a restart (replicas' stream, or
        the one a publisher carries over).  It lives in the ring (``ring.OFF_STREAM``, a word
        only the daemon writes), so a publisher that outlives its daemon knows it."""
        sid = rec.view.stream_id()
        if not sid:
            sid = secrets.randbits(63) | 1
            rec.view.q[ring.OFF_STREAM // 8] = sid
        return sid

    def _local_directory(self) -> dict[str, Entry]:
        out = {}
        for name, rec in self.d.registry.channels.items():
            e = self._entry(name, rec)
            if e is not None:
                out[name] = e
        return out

    def _entry(self, name: str, rec) -> Entry | None:
        """What this node announces for its channel ``name``."""
        try:
            tail, seq = ring.stream_point(rec.view)
        except RingCorrupted as exc:
            # Never fatal to the daemon: a ring a client corrupted is reported by ls/stat;
            # a replica whose head a landing batch moved past its last frame is consistent
            # again at its commit.  Announce what was last announced until then.
            log.debug("directory: %s skipped this pass: %s", name, exc)
            return self.directory.announced().get(name)
        # Interest: a live subscriber here (mirror slots of this node's own sources have
        # negative client ids and are not subscribers).
        subscribed = int(any(slot.client >= 0 for slot in rec.slots.values()))
        entry = self.replicas.get(name)
        if entry is not None:   # in the source's positions and numbers (a restart resumes)
            return Entry(rec.mode, rec.capacity, max(tail - entry.sink.off, 0),
                         max(seq - entry.sink.seq_off, 0), REPLICA, entry.node, entry.stream,
                         subscribed=subscribed)
        if rec.publisher is not None or tail:
            return Entry(rec.mode, rec.capacity, tail, seq, PUBLISHED, "",
                         self._stream_id(rec), rec.max_publishers, subscribed)
        return Entry(rec.mode, rec.capacity, tail, seq, OPEN, publishers=rec.max_publishers,
                     subscribed=subscribed)

    # -- reporting ---------------------------------------------------------------------------------
    def annotate(self, desc: dict) -> dict:
        name = desc["name"]
        entry = self.replicas.get(name)
        if entry is not None:
            desc["node"] = entry.node
            desc["replica"] = {"state": entry.state, "link": entry.sink.v.link_state(),
                               "reconnects": entry.reconnects, **entry.sink.describe()}
        else:
            desc["node"] = self.node
        desc["mirrors"] = [{"to": e.node, **e.source.describe()}
                           for e in self.sources.values() if e.name == name]
        desc["subscribed_on"] = self.directory.interested(name, self.node)
        if name in self.conflicts:
            desc["conflict"] = self.conflicts[name]
            desc["node"] += " (conflict: " + self.conflicts[name].split(": ")[0] + ")"
        return desc

    def remote_channels(self) -> list[dict]:
        """Names peers hold that this node does not: where each is published (if anywhere)."""
        out = []
        for name, holders in self.directory.names().items():
            if name in self.d.registry.channels:
                continue
            pubs = [n for n, e in holders if e.kind == PUBLISHED]
            mode, cap = holders[0][1].mode, holders[0][1].capacity
            item = {"name": name, "node": pubs[0] if pubs else "",
                    "published": bool(pubs), "mode": ring.MODE_NAMES[mode], "capacity": cap,
                    "open_on": [n for n, _ in holders],
                    "subscribed_on": [n for n, e in holders if e.subscribed],
                    "link": "down" if pubs and pubs[0] in self.directory.down_since else "up"}
            if len(pubs) > 1:
                item["conflict"] = f"published on nodes {', '.join(pubs)}"
            out.append(item)
        return out

    def describe(self) -> dict:
        return {"node": self.node, "enabled": self.enabled, "listen": self.listen_addr,
                "peers": list(self.s.peers), "peer_dns": self.s.peer_dns,
                "transport": self.transport_kind,
                "rdma": self.rdma_reason or "available",
                "counters": dict(self.counters),
                "links": [lk.describe() for lk in self.links.values()],
                "directory": {"nodes": sorted(self.directory.nodes), "entries":
                              self.directory.size(),
                              "down": sorted(self.directory.down_since)},
                "conflicts": dict(self.conflicts),
                "mirrors": [{"name": e.name, "to": e.node, **e.source.describe()}
                            for e in self.sources.values()],
                "held": [{"name": h.name, "node": k[0]} for k, h in self.held.items()],
                "replicas": [{"name": e.name, "from": e.node, "state": e.state,
                              "link": e.sink.v.link_state(), "reconnects": e.reconnects,
                              **e.sink.describe()} for e in self.replicas.values()]}

    # -- shutdown ----------------------------------------------------------------------------------
    def _drain(self) -> None:
        """Before the rings go: mark mirrored channels retired (their publishers stop and
        reopen), then let every mirror send what its ring still holds and, for reliable
        channels, hear the replica's credit for it, for at most ``peer_drain_timeout``.  A
        graceful restart of a publishing node so loses nothing its publishers' ``publish``
        returned for, and the replicas' positions are where the restarted daemon continues."""
        live = [e for e in self.sources.values() if not e.source.stopped]
        if not live:
            return
        for e in live:
            rec = self.d.registry.channels.get(e.name)
            if rec is not None:
                rec.view.q[ring.OFF_RETIRED // 8] = 1
        time.sleep(0.02)   # a publish that passed its retired check just before commits now
        deadline = time.monotonic() + self.s.peer_drain_timeout
        while time.monotonic() < deadline:
            pending = [e for e in live if not e.source.stopped and (
                e.source.pos != e.source.v.q[ring.OFF_TAIL // 8] or
                getattr(e.source.t, "replica_tail", e.source.pos) < e.source.pos)]
            if not pending:
                return
            time.sleep(0.005)
        log.warning("shutdown: %d mirrors not drained within peer_drain_timeout=%.1fs",
                    len(pending), self.s.peer_drain_timeout)

    def shutdown(self) -> None:
        if not self.enabled:
            return
        self._drain()
        self._stop.set()
        for src in self.sources.values():
            src.source.stop()
        if self.listener is not None:
            self.listener.close()
        for link in list(self.links.values()):
            link.close()
        for src in self.sources.values():
            src.source.thread.join(1.0)
        for t in self._threads:
            t.join(0.5)
        self.rdma.shutdown()
        for entry in self.replicas.values():
            entry.sink.close()
        self.sources.clear()
        os.close(self._r)
        os.close(self._w)
