"""The node daemon: one thread, one poll loop over the control socket and the session sockets.

The daemon is the control plane only.  It never touches message bytes on the local data path: it
creates and sizes rings, grants the publisher role and subscriber slots, watches liveness, reclaims
what dead clients held, and answers stats.  Any request, however malformed, gets an error reply
(or, if it is not even a well-formed ZeroMQ envelope, is dropped with a log line) and the loop
goes on.
"""

from __future__ import annotations

import fcntl
import logging
import os
import queue
import secrets
import signal
import threading
import time

import msgpack
import zmq

from shimmy import ring
from shimmy.errors import InvalidArgument, PermissionDenied, ProtocolError, ShimmyError
from shimmy.names import validate_name
from shimmy.protocol import PROTOCOL_VERSION, endpoint, session_path

from . import identity
from .config import Settings
from .registry import Registry
from .segments import Segments
from .sessions import Client, Sessions
from .streams import StreamService

log = logging.getLogger("shimmy.daemon")
DOCKER_SOCKET = "/var/run/docker.sock"
TICK = 0.1  # seconds between housekeeping passes (lease checks, idle channels)


class Daemon:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.started = time.time()
        self.socket_path = os.path.abspath(settings.socket)
        os.makedirs(os.path.dirname(self.socket_path), exist_ok=True)
        self.segments = Segments(self.socket_path, settings.shm_dir, settings.shm_reserve,
                                 settings.shm_budget)
        self.registry = Registry(settings, self.segments)
        self.counters = {"requests": 0, "errors": 0, "malformed": 0, "clients_total": 0,
                         "clients_crashed": 0, "leases_expired": 0, "slots_reclaimed": 0}
        self._stop = False
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.setsockopt(zmq.LINGER, 0)
        self.router.setsockopt(zmq.MAXMSGSIZE, settings.request_max_bytes)
        self.router.setsockopt(zmq.ROUTER_HANDOVER, 1)
        # One daemon per socket: the lock dies with its holder, so a crashed daemon never blocks
        # its successor, and the successor alone may sweep what it left.
        self._lock = open(self.socket_path + ".lock", "a")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise SystemExit(f"another shimmy daemon is running on {self.socket_path}") from None
        self.swept = self.segments.sweep()
        if os.path.exists(self.socket_path):
            os.unlink(self.socket_path)  # stale socket of a dead daemon: we hold the lock
        self.router.bind(endpoint(self.socket_path))
        os.chmod(self.socket_path, 0o666)
        self.sessions = Sessions(session_path(self.socket_path), settings.lease_timeout,
                                 settings.max_clients)
        # Peering (docs/peering.md): own threads for sockets and data; registry changes arrive
        # here as events through a pipe this loop polls (PeerService.fds / on_readable).
        from .peer.service import PeerService
        self.peer = PeerService(self)
        # Identity and access (docs/containers.md): peer credentials -> cgroup -> labels.
        self.labels = identity.DockerLabelSource()
        self._deaths: "queue.SimpleQueue[str]" = queue.SimpleQueue()
        self._death_r, self._death_w = os.pipe()
        os.set_blocking(self._death_r, False)
        os.set_blocking(self._death_w, False)
        self._stop_watch = threading.Event()
        if os.path.exists(DOCKER_SOCKET):
            threading.Thread(target=identity.watch_container_deaths, name="container-deaths",
                             args=(self._on_container_death, self._stop_watch),
                             daemon=True).start()
        self.ops = {
            "ping": self.op_ping, "hello": self.op_hello, "open": self.op_open,
            "publish": self.op_publish, "unpublish": self.op_unpublish,
            "subscribe": self.op_subscribe, "unsubscribe": self.op_unsubscribe,
            "close": self.op_close, "list": self.op_list, "stat": self.op_stat,
            "delete": self.op_delete,
        }
        self.streams = StreamService(self)
        self.ops.update(self.streams.ops())

    # -- loop --------------------------------------------------------------------------------------
    def run(self) -> None:
        log.info("daemon ready socket=%s pid=%d swept=%d", self.socket_path, os.getpid(), self.swept)
        last_tick = time.monotonic()
        try:
            while not self._stop:
                poller = zmq.Poller()
                poller.register(self.router, zmq.POLLIN)
                for fd in self.sessions.fds():
                    poller.register(fd, zmq.POLLIN)
                poller.register(self._death_r, zmq.POLLIN)
                peer_fds = self.peer.fds()
                for fd in peer_fds:
                    poller.register(fd, zmq.POLLIN)
                for sock_or_fd, _ in poller.poll(TICK * 1000):
                    if sock_or_fd is self.router:
                        self._drain_router()
                    elif sock_or_fd == self._death_r:
                        self._drain_deaths()
                    elif sock_or_fd in peer_fds:
                        self.peer.on_readable(sock_or_fd)
                    else:
                        for client in self.sessions.on_readable(sock_or_fd):
                            self._client_gone(client, crashed=True)
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
        self._stop_watch.set()
        self.peer.shutdown()  # mirror threads stop reading rings before they are retired
        self.streams.close_all()
        self.registry.close_all()
        self.sessions.close()
        self.router.close(0)
        self.ctx.term()
        for path in (self.socket_path, self.socket_path + ".lock"):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._lock.close()
        log.info("daemon stopped")

    def _housekeeping(self, now: float) -> None:
        lapsed, ghosts = self.sessions.expired(now)
        for client in lapsed:
            n = self.registry.evict_client_slots(client.id)
            self.counters["leases_expired"] += 1
            log.warning("client %d pid=%s missed heartbeats for lease_timeout=%.1fs: evicted %d "
                        "subscriber slots", client.id, client.pid, self.settings.lease_timeout, n)
        for client in ghosts:
            self._client_gone(client, crashed=False)
        self.registry.expire_idle()
        self.peer.tick(now)

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

    def _policy(self, client: Client) -> identity.AccessPolicy:
        policy = client.policy
        if policy is None:
            if client.sock is None:
                self.sessions.settle()
            policy = identity.policy_for_pid(client.pid, self.labels,
                                             default_open=self.settings.access == "open")
            client.container = policy.container_id
            if client.sock is not None:
                client.policy = policy  # identified for good; before that, ask again next time
        return policy

    def _client_gone(self, client: Client, crashed: bool) -> None:
        slots, roles = self.registry.drop_client(client.id)
        self.streams.drop_client(client.id)
        self.counters["slots_reclaimed"] += slots
        if crashed:
            self.counters["clients_crashed"] += 1
        log.info("client %d pid=%s gone: freed %d slots, %d publisher roles", client.id,
                 client.pid, slots, roles)

    def _drain_router(self) -> None:
        while True:
            try:
                frames = self.router.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            if len(frames) != 2:
                self.counters["malformed"] += 1
                log.warning("dropped control message with %d frames (expected 2)", len(frames))
                if len(frames) >= 1:
                    self._send(frames[0], None, self._error(ProtocolError(
                        "expected exactly one msgpack frame per request")))
                continue
            identity, payload = frames
            self._send(identity, *self._handle(payload))

    def _send(self, identity: bytes, req_id, reply: dict) -> None:
        reply["v"] = PROTOCOL_VERSION
        reply["id"] = req_id
        try:
            self.router.send_multipart([identity, msgpack.packb(reply)], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            log.warning("could not reply to a client: %s", exc)

    @staticmethod
    def _error(exc: ShimmyError) -> dict:
        return {"ok": False, "error": {"code": exc.code, "message": str(exc)}}

    def _handle(self, payload: bytes):
        self.counters["requests"] += 1
        req_id = None
        try:
            try:
                # Size is already bounded by ZMQ_MAXMSGSIZE (request_max_bytes).
                req = msgpack.unpackb(payload, raw=False, strict_map_key=True)
            except Exception as exc:
                raise ProtocolError(f"request is not valid msgpack: {type(exc).__name__}") from None
            if not isinstance(req, dict):
                raise ProtocolError(f"request must be a msgpack map, got {type(req).__name__}")
            req_id = req.get("id") if isinstance(req.get("id"), int) else None
            if req.get("v") != PROTOCOL_VERSION:
                raise ProtocolError(f"protocol version {req.get('v')!r} not supported; this "
                                    f"daemon speaks {PROTOCOL_VERSION}")
            op = req.get("op")
            handler = self.ops.get(op) if isinstance(op, str) else None
            if handler is None:
                raise ProtocolError(f"unknown op {op!r}; known: {sorted(self.ops)}")
            result = handler(req)
            result["ok"] = True
            return req_id, result
        except ShimmyError as exc:
            self.counters["errors"] += 1
            if isinstance(exc, ProtocolError):
                self.counters["malformed"] += 1
            return req_id, self._error(exc)
        except Exception as exc:  # a bug must not take the node's channels down with it
            self.counters["errors"] += 1
            log.exception("internal error handling a request")
            return req_id, self._error(ShimmyError(f"internal daemon error: {type(exc).__name__}: {exc}"))

    # -- request helpers ---------------------------------------------------------------------------
    @staticmethod
    def _field(req: dict, key: str, kind, optional: bool = False):
        value = req.get(key)
        if value is None and optional:
            return None
        if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
            raise InvalidArgument(f"field {key!r} must be {getattr(kind, '__name__', kind)}, "
                                  f"got {type(value).__name__}")
        return value

    def _client(self, req: dict) -> Client:
        """The client a request speaks for.  Client ids are small integers anyone could guess,
        so a request must also carry the client's secret token from ``hello``: a process cannot
        act (and be judged by the access policy) as another."""
        cid = self._field(req, "client", int)
        client = self.sessions.clients.get(cid)
        if client is None:
            raise InvalidArgument(f"unknown client {cid}; say hello first")
        token = req.get("token")
        if not isinstance(token, str) or not secrets.compare_digest(token, client.token):
            raise PermissionDenied(f"request for client {cid} without that client's token")
        return client

    def _channel(self, req: dict):
        return self.registry.get(validate_name(req.get("name")))

    # -- operations --------------------------------------------------------------------------------
    def op_ping(self, req: dict) -> dict:
        return {"pid": os.getpid(), "uptime": time.time() - self.started,
                "protocol": PROTOCOL_VERSION}

    def op_hello(self, req: dict) -> dict:
        pid = self._field(req, "pid", int)
        if len(self.sessions.clients) >= self.settings.max_clients:
            from shimmy.errors import LimitExceeded
            raise LimitExceeded(f"max_clients ({self.settings.max_clients}) clients attached")
        client = self.sessions.new_client(pid)
        self.counters["clients_total"] += 1
        return {"client": client.id, "token": client.token, "session": self.sessions.path,
                "heartbeat_interval": self.settings.heartbeat_interval,
                "lease_timeout": self.settings.lease_timeout}

    def op_open(self, req: dict) -> dict:
        client = self._client(req)
        name = validate_name(req.get("name"))
        mode = self._field(req, "mode", str, optional=True)
        capacity = self._field(req, "capacity", int, optional=True)
        create = bool(req.get("create", True))
        self._policy(client).check_open(name)
        if create and name not in self.registry.channels:
            self.peer.prepare_open(name, mode, capacity)  # published on a peer: make a replica
        rec = self.registry.open(client.id, name, mode, capacity, create)
        return {"shm": rec.shm_name, "sem_prefix": self.segments.sem_prefix(rec.token),
                "mode": ring.MODE_NAMES[rec.mode], "capacity": rec.capacity,
                "max_message": ring.max_message_size(rec.capacity)}

    def op_close(self, req: dict) -> dict:
        client = self._client(req)
        rec = self._channel(req)
        rec.holders.discard(client.id)
        if rec.publisher == client.id:
            rec.publisher = None
        if not rec.holders:
            rec.idle_since = time.monotonic()
        return {}

    def op_publish(self, req: dict) -> dict:
        client = self._client(req)
        rec = self._channel(req)
        self._policy(client).check("publish", rec.name)
        self.peer.check_publish(rec)  # one publisher cluster-wide: names the node holding it
        self.registry.grant_publisher(rec, client.id, client.pid or client.claimed_pid)
        return {}

    def op_unpublish(self, req: dict) -> dict:
        client = self._client(req)
        rec = self._channel(req)
        if rec.publisher == client.id:
            rec.publisher = None
        return {}

    def op_subscribe(self, req: dict) -> dict:
        client = self._client(req)
        rec = self._channel(req)
        self._policy(client).check("subscribe", rec.name)
        start = self._field(req, "start", str, optional=True) or "next"
        slot = self.registry.add_subscriber(rec, client.id, client.pid or client.claimed_pid, start)
        self.peer.on_subscribe(rec)  # a replica: ask its publishing node for a mirror
        return {"slot": slot.index, "generation": slot.generation, "seq": slot.seq,
                "position": rec.view.q[rec.view.slot_word(slot.index)]}

    def op_unsubscribe(self, req: dict) -> dict:
        client = self._client(req)
        rec = self._channel(req)
        self.registry.remove_subscriber(rec, self._field(req, "slot", int), client.id)
        return {}

    def op_list(self, req: dict) -> dict:
        return {"channels": [self.peer.annotate(rec.describe())
                             for rec in self.registry.channels.values()],
                "remote": self.peer.remote_channels(), "node": self.peer.node,
                "streams": self.streams.describe()}

    def op_stat(self, req: dict) -> dict:
        return {"pid": os.getpid(), "uptime": time.time() - self.started,
                "socket": self.socket_path, "counters": dict(self.counters),
                "shm_allocated": self.segments.allocated,
                "settings": {k: v for k, v in vars(self.settings).items() if k != "extra"},
                "clients": [c.describe() for c in self.sessions.clients.values()],
                "channels": [self.peer.annotate(rec.describe())
                             for rec in self.registry.channels.values()],
                "peer": self.peer.describe(),
                "streams": self.streams.describe()}

    def op_delete(self, req: dict) -> dict:
        name = validate_name(req.get("name"))
        self._policy(self._client(req)).check("publish", name)  # deleting is a publisher's act
        self.registry.delete(name)
        return {}


def run(settings: Settings) -> None:
    level = getattr(logging, settings.log_level.upper(), logging.INFO)
    logging.basicConfig(level=level, format='%(asctime)s %(levelname)s %(name)s %(message)s')
    daemon = Daemon(settings)
    daemon.install_signal_handlers()
    daemon.run()
