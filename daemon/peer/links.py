"""The links room of the peer module: one authenticated ``Link`` per peer node, and the threads
that make them: the acceptor, a handshake per accepted connection, a dialer per ``--peer`` and
per address DNS discovery finds.  Each link, once up, is read by the thread that made it
(``Link.run_reader``) until it dies; its control messages and its coming and going are handed to
``PeerService`` (``on_link_ctrl``, ``link_up``, ``link_down``).

This module never touches the registry, rings or mirrors: it knows nodes and sockets only.

Threads (all daemon threads):

* acceptor: accepts on ``peer_listen``; each connection authenticates in its own short-lived
  thread (each bounded by ``peer_handshake_timeout``; at ``peer_max_pending`` pending, the
  oldest is cut), then that thread becomes the link's reader;
* one dialer per ``--peer``: connect, authenticate, read until the link dies, then reconnect with
  capped exponential backoff (``peer_backoff_initial`` doubling up to ``peer_backoff_max``);
* with ``peer_dns``, a resolver that starts a dialer per address found (``_discover_loop``).

``up`` (the links by id) changes on the daemon's main thread only (``add``, ``remove``).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
import time

from ..logformat import Throttle
from . import auth
from .mirror import ReplicaViolation
from .tcp import Link, LinkError
from .transport import TransportClosed

log = logging.getLogger("shimmy.peer")


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


class Links:
    """The peer links of one daemon (``svc``: its ``PeerService``)."""

    def __init__(self, svc):
        self.svc = svc
        self.s = svc.s
        self.node = svc.node
        self.counters = svc.counters
        self.stopping: threading.Event = svc.stopping
        self.up: dict[int, Link] = {}
        self.seen_nodes: set[str] = set()
        self._pending: dict[socket.socket, float] = {}    # unauthenticated connections
        self._pending_lock = threading.Lock()
        self.listener: socket.socket | None = None
        self.listen_addr: str = ""
        self._warn = Throttle(log).warning   # what a flood of connections repeats

    def start(self) -> None:
        """Load the cluster key and TLS, listen, start the dialers (peering enabled)."""
        s = self.s
        self.key = auth.load_key(s.cluster_key_file)
        self.tls_server, self.tls_client = auth.tls_contexts(s.peer_tls_cert, s.peer_tls_key,
                                                             s.peer_tls_ca)
        if s.peer_listen:
            host, port = parse_addr(s.peer_listen)
            self.listener = socket.create_server((host, port), reuse_port=False)
            self.listener.settimeout(0.25)
            self.listen_addr = "%s:%d" % self.listener.getsockname()[:2]
            self.svc.spawn(self._accept_loop, "peer-accept")
            log.info("peer listening on %s node=%s", self.listen_addr, self.node)
        for addr in s.peers:
            self.svc.spawn(self._dial_loop, f"peer-dial-{addr}", parse_addr(addr), addr)
        if s.peer_dns:
            self.svc.spawn(self._discover_loop, "peer-dns", *parse_addr(s.peer_dns))

    # -- connections (threads) ---------------------------------------------------------------------
    def refused(self, who: str, exc: Exception, reason: str) -> None:
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
        while not self.stopping.is_set():
            try:
                conn, addr = listener.accept()
            except socket.timeout:
                continue
            except OSError as exc:
                if self.stopping.is_set() or listener.fileno() < 0:
                    return
                # EMFILE/ENFILE/ENOMEM: count, log (throttled), let handshakes finish and free
                # descriptors for accept_backoff, go on.
                self.counters["accept_errors"] += 1
                self._warn("accept", "peer accept failed: %s; pausing accepts for "
                           "accept_backoff=%.2fs", exc, self.s.accept_backoff)
                self.stopping.wait(self.s.accept_backoff)
                continue
            who = "%s:%d" % addr[:2]
            self._admit(conn)
            self.svc.spawn(self._serve_conn, f"peer-in-{who}", conn, who)

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
            self.refused(who, exc, exc.reason)
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
                self.refused(who, exc if str(exc) else Exception(type(exc).__name__),
                              "protocol")
            conn.close()
            return
        self._handshake_done(conn)
        self.counters["links_accepted"] += 1
        self._run_link(sock, remote, who, dialed=False)

    def _check_remote(self, remote: str, dialed: bool) -> None:
        if remote == self.node:
            raise auth.PeerRefused("self", f"peer uses our own node name {remote!r}")
        if self.kept(remote) is not None and not self.preferred(remote, dialed):
            raise auth.PeerRefused("duplicate", f"already linked to {remote!r}")
        if len(self.up) >= self.s.peer_max_links:
            raise auth.PeerRefused("protocol", f"peer_max_links={self.s.peer_max_links} links up")

    def preferred(self, remote: str, dialed: bool) -> bool:
        """Two daemons that dial each other keep one link: the one dialed by the node whose name
        sorts first.  Both ends decide alike, without a message."""
        dialer = self.node if dialed else remote
        return dialer == min(self.node, remote)

    def kept(self, remote: str) -> Link | None:
        for lk in list(self.up.values()):
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
        while not self.stopping.is_set():
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
                self.svc.spawn(self._dial_loop, f"peer-dial-{ip}", (ip, port), f"{ip}:{port}")
            if self.stopping.wait(self.s.peer_dns_interval):
                return

    def _dial_loop(self, addr: tuple[str, int], text: str) -> None:
        backoff = self.s.peer_backoff_initial
        remote = ""     # node name at this address, once known
        while not self.stopping.is_set():
            # Linked already through the other node's dial: wait while that link lives.
            while remote and self.kept(remote) is not None:
                if self.stopping.wait(self.s.peer_backoff_max):
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
                self.refused(text, exc, exc.reason)
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
            if self.stopping.wait(backoff):
                return
            backoff = min(backoff * 2, self.s.peer_backoff_max)

    def _run_link(self, sock: socket.socket, remote: str, who: str, dialed: bool) -> None:
        sock.settimeout(self.s.peer_link_timeout)
        link = Link(sock, self.node, remote, who, dialed, self.s.peer_max_control_bytes,
                    self.s.peer_keepalive)
        self.svc.call_soon(self.svc.link_up, link)
        try:
            link.run_reader(self.svc.on_link_ctrl, self.s.peer_max_replica_capacity)
        except LinkError as exc:
            self.refused(f"{remote} ({who})", exc, exc.reason)
        except ReplicaViolation as exc:
            self.refused(f"{remote} ({who})", exc, "protocol")
        except (TransportClosed, OSError) as exc:
            log.info("peer link to %s (%s) down: %s", remote, who, exc or type(exc).__name__)
        finally:
            link.close()
            self.svc.call_soon(self.svc.link_down, link)

    # -- lifecycle (main thread) -------------------------------------------------------------------
    def keep(self, link: Link) -> bool:
        """A link came up: False when it is a duplicate (closed here)."""
        if link.closed:
            return False
        other = self.kept(link.remote)
        if other is not None:
            # Both ends dialed at once and both handshakes passed: keep the preferred link.
            keep_new = self.preferred(link.remote, link.dialed)
            drop = other if keep_new else link
            self.counters["duplicate_links"] += 1
            log.info("peer %s: two links (both ends dialed); keeping the one dialed by %s",
                     link.remote, min(self.node, link.remote))
            drop.close()
            if not keep_new:
                return False
        return True

    def add(self, link: Link) -> None:
        self.up[link.id] = link
        if link.remote in self.seen_nodes:
            self.counters["reconnects"] += 1
        self.seen_nodes.add(link.remote)
        log.info("peer link up: node=%s addr=%s %s", link.remote, link.addr,
                 "dialed" if link.dialed else "accepted")

    def remove(self, link: Link) -> bool:
        """A link went down: False for a duplicate closed before it was ever used."""
        return self.up.pop(link.id, None) is not None

    def close(self) -> None:
        if self.listener is not None:
            self.listener.close()
        for link in list(self.up.values()):
            link.close()
