"""``PeerService``: the daemon's peering, driven from the daemon's main loop plus a few threads.

Threads (all daemon threads, none touches the registry):

* acceptor: accepts on ``peer_listen``; each connection authenticates in its own short-lived
  thread (at most ``peer_max_pending`` at once, each bounded by ``peer_handshake_timeout``), then
  that thread becomes the link's reader;
* one dialer per ``--peer``: connect, authenticate, read until the link dies, then reconnect with
  capped exponential backoff (``peer_backoff_initial`` doubling up to ``peer_backoff_max``);
* per link a writer (control messages, keepalives); per mirror source a sender;
* one credit thread reporting replica consumption back to sources.

Everything that changes the daemon's books (channels, slots, mirrors) runs on the main thread:
threads post events on a queue and write a byte to a pipe the main loop polls (``fds``,
``on_readable``); periodic work runs in ``tick``.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import queue
import socket
import threading
import time
from dataclasses import dataclass, field

from shimmy import ring
from shimmy.errors import ChannelConflict, InvalidArgument, LimitExceeded

from . import auth
from .mirror import MirrorReplica, MirrorSource, ReplicaViolation
from .tcp import Link, LinkError, send_credit
from .transport import TransportClosed

log = logging.getLogger("shimmy.peer")

REPLICA_PUBLISHER = -1          # registry publisher id meaning "the daemon (peer module)"
_MIRROR_CLIENT_BASE = -1000     # registry client ids of mirror source slots: -1000, -1001, ...


def _ip_key(ip: str) -> tuple:
    """Sort key for addresses (numeric where possible) for the one-dialer-per-pair rule."""
    try:
        return (0, int(ipaddress.ip_address(ip)))
    except ValueError:
        return (1, ip)


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


class PeerService:
    def __init__(self, daemon):
        self.d = daemon
        s = self.s = daemon.settings
        self.node = s.node or socket.gethostname()
        self.enabled = bool(s.peer_listen or s.peers or s.peer_dns)
        self.counters = {"auth_failures": 0, "protocol_errors": 0, "refused_sizes": 0,
                         "refused_busy": 0, "links_accepted": 0, "links_dialed": 0,
                         "reconnects": 0, "mirrors_served": 0, "mirrors_requested": 0,
                         "replica_resets": 0, "rdma_fallbacks": 0, "peers_discovered": 0}
        self.links: dict[int, Link] = {}
        self.remote_dirs: dict[int, dict[str, tuple[int, int]]] = {}
        self.sources: dict[tuple[int, int], SourceEntry] = {}
        self.held: dict[tuple[str, str], HeldSlot] = {}
        self.replicas: dict[str, ReplicaEntry] = {}
        self.seen_nodes: set[str] = set()
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._credit_wake = threading.Event()   # set by replica commits
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._pending = threading.Semaphore(s.peer_max_pending)
        self._next_mid = 1
        self._next_client = _MIRROR_CLIENT_BASE
        self._announced: dict | None = None
        self._last_announce = 0.0
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
        key = {"auth": "auth_failures", "size": "refused_sizes"}.get(reason, "protocol_errors")
        self.counters[key] += 1
        log.warning("peer refused %s: %s: %s", who, reason, exc)

    def _prepare(self, sock: socket.socket, server: bool) -> socket.socket:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.s.peer_handshake_timeout)
        ctx = self.tls_server if server else self.tls_client
        if ctx is not None:
            sock = ctx.wrap_socket(sock, server_side=server)
        return sock

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, addr = self.listener.accept()
            except socket.timeout:
                continue
            except OSError:
                return
            who = "%s:%d" % addr[:2]
            if not self._pending.acquire(blocking=False):
                self.counters["refused_busy"] += 1
                log.warning("peer refused %s: busy: peer_max_pending=%d handshakes in progress",
                            who, self.s.peer_max_pending)
                conn.close()
                continue
            self._spawn(self._serve_conn, f"peer-in-{who}", conn, who)

    def _serve_conn(self, conn: socket.socket, who: str) -> None:
        released = False
        try:
            try:
                sock = self._prepare(conn, server=True)
                remote = auth.accept_handshake(sock, self.key, self.node)
                self._check_remote(remote)
            except auth.PeerRefused as exc:
                self._refused(who, exc, exc.reason)
                conn.close()
                return
            except (OSError, ValueError) as exc:
                self._refused(who, exc if str(exc) else type(exc).__name__, "protocol")
                conn.close()
                return
            self._pending.release()
            released = True
            self.counters["links_accepted"] += 1
            self._run_link(sock, remote, who, dialed=False)
        finally:
            if not released:
                self._pending.release()

    def _check_remote(self, remote: str) -> None:
        if remote == self.node:
            raise auth.PeerRefused("self", f"peer uses our own node name {remote!r}")
        if len(self.links) >= self.s.peer_max_links:
            raise auth.PeerRefused("protocol", f"peer_max_links={self.s.peer_max_links} links up")

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
                found = {ai[4][0] for ai in socket.getaddrinfo(name, port, type=socket.SOCK_STREAM)}
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
        while not self._stop.is_set():
            sock = None
            try:
                sock = socket.create_connection(addr, timeout=self.s.peer_handshake_timeout)
                sock = self._prepare(sock, server=False)
                remote = auth.dial_handshake(sock, self.key, self.node)
                self._check_remote(remote)
                self.counters["links_dialed"] += 1
                backoff = self.s.peer_backoff_initial
                self._run_link(sock, remote, text, dialed=True)
            except auth.PeerRefused as exc:
                self._refused(text, exc, exc.reason)
                if exc.reason == "self":
                    return  # DNS discovery without a known own address found ourselves
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
        """Report each replica's consumed position to its source.  While a replica holds data
        its subscribers have not consumed, poll every ``peer_credit_interval``; when everything
        is consumed, sleep until the next replica commit (not a fixed period: a reliable source
        whose ring is full waits for exactly this credit)."""
        interval = self.s.peer_credit_interval
        refresh = False
        while not self._stop.is_set():
            self._credit_wake.clear()
            busy = False
            for entry in list(self.replicas.values()):
                link = entry.link
                if entry.state != "streaming" or link is None or link.closed:
                    continue
                c = entry.sink.consumed()
                if c != entry.last_credit or refresh:
                    # (refresh: an idle link repeats its credit now and then, so a credit the
                    # source could not apply never leaves a reliable publisher waiting)
                    entry.last_credit = c
                    busy = busy or not refresh
                    try:
                        send_credit(link, entry.mid, c, entry.sink.tail)
                    except TransportClosed:
                        pass
                elif entry.sink.tail != c:
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
        self.links[link.id] = link
        if link.remote in self.seen_nodes:
            self.counters["reconnects"] += 1
        self.seen_nodes.add(link.remote)
        log.info("peer link up: node=%s addr=%s %s", link.remote, link.addr,
                 "dialed" if link.dialed else "accepted")
        link.send_ctrl({"t": "dir", "node": self.node, "channels": self._directory()})
        self._request_mirrors()

    def _ev_link_down(self, link: Link) -> None:
        self.links.pop(link.id, None)
        self.remote_dirs.pop(link.id, None)
        for key, entry in list(self.sources.items()):
            if entry.link is link:
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
        for name, (mode, capacity, tail, seq) in obj["channels"].items():
            if not isinstance(name, str) or mode not in ring.MODE_NAMES or not all(
                    isinstance(x, int) and x >= 0 for x in (capacity, tail, seq)):
                raise ValueError(f"bad directory entry {name!r}")
            if capacity > self.s.peer_max_replica_capacity or capacity < ring.MIN_CAPACITY \
                    or capacity & (capacity - 1):
                self.counters["refused_sizes"] += 1
                log.warning("peer %s announced channel %r with capacity %d outside "
                            "[%d, peer_max_replica_capacity=%d]: not mirrorable", link.remote,
                            name, capacity, ring.MIN_CAPACITY, self.s.peer_max_replica_capacity)
                continue
            channels[name] = (mode, capacity, tail, seq)
        self.remote_dirs[link.id] = channels
        self._request_mirrors()

    def _ctrl_mirror(self, link: Link, obj: dict) -> None:
        """Source side: a peer wants a mirror of one of our channels."""
        mid, name = int(obj["id"]), str(obj["name"])
        resume = obj.get("resume")
        consumed = obj.get("consumed")
        rec = self.d.registry.channels.get(name)
        if rec is None or name in self.replicas:
            link.send_ctrl({"t": "mirror_err", "id": mid,
                            "message": f"channel {name!r} is not published on {self.node}"})
            return
        if (link.id, mid) in self.sources:
            self._stop_source((link.id, mid), hold=False)
        q = rec.view.q
        held = self.held.pop((link.remote, name), None)
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
        if not isinstance(resume, int) or resume < 0 or resume > tail:
            resume_pos = None if not isinstance(resume, int) or resume < 0 else resume
            start, start_seq = ring.stream_point(rec.view)
            if resume_pos is not None:
                log.warning("mirror %s to %s: replica at %d is ahead of our tail %d (our stream "
                            "restarted): it will be reset", name, link.remote, resume, tail)
        elif resume < head:
            resume_pos = resume
            start, start_seq = ring.stream_point(rec.view, oldest=True)
            log.warning("mirror %s to %s: replica resumes at %d but we hold only from %d: gap",
                        name, link.remote, resume, start)
        else:
            resume_pos = start = resume
        hold_at = start
        if isinstance(consumed, int) and resume_pos is not None and 0 <= consumed <= start:
            hold_at = consumed
        # SYNC POINT: the mirror's slot position; reliable publishers keep everything from here.
        q[rec.view.slot_word(slot)] = hold_at
        transport = self.rdma.source_transport(link, mid, rec, obj.get("rdma"))
        src = MirrorSource(name, rec.view, slot, self.d.segments.sem_prefix(rec.token) + str(slot),
                           transport, start, start_seq, resume_pos)
        src.credit = hold_at
        self.sources[(link.id, mid)] = SourceEntry(link, mid, name, client, slot, src, link.remote)
        self.counters["mirrors_served"] += 1
        link.send_ctrl({"t": "mirror_ok", "id": mid, "start": start,
                        "mode": ring.MODE_NAMES[rec.mode], "capacity": rec.capacity,
                        "transport": transport.kind})
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
    def find_publisher(self, name: str):
        for link_id, channels in self.remote_dirs.items():
            if name in channels:
                return self.links[link_id], channels[name]
        return None, None

    def prepare_open(self, name: str, mode: str | None, capacity: int | None) -> None:
        """Before ``op_open`` of a channel this node lacks: make it a replica if a peer
        publishes it (same mode and capacity as the source)."""
        if not self.enabled or name in self.d.registry.channels:
            return
        link, info = self.find_publisher(name)
        if link is None:
            return
        rmode, rcap, tail, seq = info
        if mode is not None and ring.MODES.get(mode) != rmode:
            raise ChannelConflict(f"channel {name!r} is published on node {link.remote} with "
                                  f"mode={ring.MODE_NAMES[rmode]!r}, asked for mode={mode!r}")
        if capacity is not None and capacity != rcap:
            raise ChannelConflict(f"channel {name!r} is published on node {link.remote} with "
                                  f"capacity={rcap}, asked for capacity={capacity}")
        if len(self.replicas) >= self.s.peer_max_replicas:
            raise LimitExceeded(f"cannot mirror {name!r}: peer_max_replicas "
                                f"({self.s.peer_max_replicas}) replicas exist")
        if rcap > self.s.max_capacity:
            raise LimitExceeded(f"cannot mirror {name!r}: its capacity {rcap} exceeds this "
                                f"node's max_capacity {self.s.max_capacity}")
        rec = self.d.registry._create(name, ring.MODE_NAMES[rmode], rcap)
        rec.publisher = REPLICA_PUBLISHER
        sink = MirrorReplica(rec.view, self.d.segments.sem_prefix(rec.token))
        sink.on_commit = self._credit_wake.set
        # Position the replica at the source's tail as last announced, before any subscriber
        # can attach: "next" subscribers then start there with the exact sequence number, and
        # the mirror resumes from it (or reports the gap if the source no longer holds it).
        sink.jump(tail, seq)
        sink.set_link(ring.LINK_DOWN)
        self.replicas[name] = ReplicaEntry(name, link.remote, sink)
        log.info("channel %s is published on %s: created replica", name, link.remote)

    def on_subscribe(self, rec) -> None:
        entry = self.replicas.get(rec.name)
        if entry is not None:
            entry.last_subscriber = time.monotonic()
            if entry.state in ("idle", "failed"):
                self._request_mirrors()

    def _request_mirrors(self) -> None:
        now = time.monotonic()
        for entry in self.replicas.values():
            if entry.state not in ("idle", "failed") or entry.retry_at > now:
                continue
            rec = self.d.registry.channels.get(entry.name)
            if rec is None or not rec.slots:
                continue
            link = None
            for lk in self.links.values():
                if lk.remote == entry.node and entry.name in self.remote_dirs.get(lk.id, {}):
                    link = lk
                    break
            if link is None:
                link, _ = self.find_publisher(entry.name)
            if link is None:
                continue
            mid = self._next_mid
            self._next_mid += 1
            entry.link, entry.mid, entry.state = link, mid, "requested"
            entry.node = link.remote
            entry.last_credit = -1
            sink = entry.sink
            sink.next = sink.tail   # drop any put of an earlier stream that was never committed
            link.sinks[mid] = sink
            link.send_ctrl({"t": "mirror", "id": mid, "name": entry.name,
                            "resume": sink.tail if sink.fed else -1,
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
    def tick(self, now: float) -> None:
        if not self.enabled:
            return
        d = self._directory()
        if d != self._announced or now - self._last_announce > 5.0:
            self._announced = d
            self._last_announce = now
            for link in self.links.values():
                link.send_ctrl({"t": "dir", "node": self.node, "channels": d})
        for key, entry in list(self.sources.items()):
            if entry.source.stopped:
                self._stop_source(key, hold=True)
        for k, held in list(self.held.items()):
            if now - held.since > self.s.peer_hold:
                rec = self.d.registry.channels.get(held.name)
                log.warning("mirror %s to %s: no reconnect within peer_hold=%.1fs; releasing "
                            "its data (a later resume reports a gap)", held.name, k[0],
                            self.s.peer_hold)
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
                log.warning("replica %s: source %s restarted its stream; retiring the replica "
                            "(subscribers reopen)", name, entry.node)
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

    def _forget_replica(self, entry: ReplicaEntry) -> None:
        self.rdma.release(entry.name)
        if entry.link is not None:
            entry.link.sinks.pop(entry.mid, None)
            entry.link.send_ctrl({"t": "unmirror", "id": entry.mid})
        entry.sink.close()
        self.replicas.pop(entry.name, None)

    def _directory(self) -> dict:
        out = {}
        for name, rec in self.d.registry.channels.items():
            if name in self.replicas:
                continue
            if rec.publisher is not None or rec.view.q[ring.OFF_TAIL // 8]:
                out[name] = [rec.mode, rec.capacity, *ring.stream_point(rec.view)]
        return out

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
        return desc

    def remote_channels(self) -> list[dict]:
        out = []
        for link_id, channels in self.remote_dirs.items():
            link = self.links.get(link_id)
            for name, (mode, cap, _tail, _seq) in channels.items():
                if name not in self.d.registry.channels:
                    out.append({"name": name, "node": link.remote if link else "?",
                                "mode": ring.MODE_NAMES[mode], "capacity": cap})
        return out

    def describe(self) -> dict:
        return {"node": self.node, "enabled": self.enabled, "listen": self.listen_addr,
                "peers": list(self.s.peers), "peer_dns": self.s.peer_dns,
                "transport": self.transport_kind,
                "rdma": self.rdma_reason or "available",
                "counters": dict(self.counters),
                "links": [lk.describe() for lk in self.links.values()],
                "mirrors": [{"name": e.name, "to": e.node, **e.source.describe()}
                            for e in self.sources.values()],
                "held": [{"name": h.name, "node": k[0]} for k, h in self.held.items()],
                "replicas": [{"name": e.name, "from": e.node, "state": e.state,
                              "link": e.sink.v.link_state(), "reconnects": e.reconnects,
                              **e.sink.describe()} for e in self.replicas.values()]}

    # -- shutdown ----------------------------------------------------------------------------------
    def shutdown(self) -> None:
        if not self.enabled:
            return
        self._stop.set()
        for entry in self.sources.values():
            entry.source.stop()
        if self.listener is not None:
            self.listener.close()
        for link in list(self.links.values()):
            link.close()
        for entry in self.sources.values():
            entry.source.thread.join(1.0)
        for t in self._threads:
            t.join(0.5)
        self.rdma.shutdown()
        for entry in self.replicas.values():
            entry.sink.close()
        self.sources.clear()
        os.close(self._r)
        os.close(self._w)
