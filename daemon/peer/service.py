"""``PeerService``: the daemon's peering, driven from the daemon's main loop plus a few threads.

The service is the hub of four rooms and keeps what joins them:

* ``links.py``: the peer links (accept, admit, dial, DNS discovery, link lifecycle);
* ``sources.py``: the source side (mirror requests served, held slots, interest holds, carried
  and continued streams);
* ``replicas.py``: the replica side (open and convert, reconcile, mirror requests, credits);
* ``rdma_mirrors.py``: which transport each mirror runs over;

and here: the events threads hand to the main thread, the dispatch of control messages
(``CONTROL``), the cluster directory (``directory.py``: what this node announces, what peers
announce), the periodic ``tick``, and reporting (``ls``, ``stat``, metrics).

Everything that changes the daemon's books (channels, slots, mirrors) runs on the main thread:
threads hand work over with ``call_soon``, which queues it and writes a byte to a pipe the main
loop polls (``fds``, ``on_readable``); periodic work runs in ``tick``.  One exception is a link
reader's handling of an RDMA guard acknowledgement (``on_link_ctrl``): it only wakes the
waiting mirror source thread, so it does not wait for the main loop.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
import threading
import time
from typing import Callable

from shimmy import ring
from shimmy.errors import PublisherBusy, RingCorrupted

from .directory import OPEN, PUBLISHED, REPLICA, BadAnnouncement, Directory, Entry, parse_entry
from .links import Links
from .rdma_mirrors import RdmaMirrors
from .replicas import ReplicaSide
from .sources import SourceSide
from .tcp import Link, LinkError

log = logging.getLogger("shimmy.peer")


def _interest(e: Entry | None) -> tuple | None:
    """What of a peer's entry decides whether this node holds a ring for it (a tail that moves
    does not)."""
    return None if e is None else (e.kind, e.subscribed, e.source, e.mode, e.capacity)


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
        self.directory = Directory()
        self.stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self.links = Links(self)
        self.source_side = SourceSide(self)
        self.replica_side = ReplicaSide(self)
        # The rooms' books by name, for reporting (the same dicts, never rebound).
        self.sources = self.source_side.entries
        self.held = self.source_side.held
        self.replicas = self.replica_side.entries
        self.rdma = RdmaMirrors(s, self.counters, self.replica_side, self.call_soon)
        self.transport_kind = s.transport
        self.rdma_reason = self.rdma.reason
        # Control messages from peers, by type (the link's main-thread handlers).
        self.CONTROL: dict[str, Callable[[Link, dict], None]] = {
            "dir": self._ctrl_dir,
            "mirror": self.source_side.serve,
            "unmirror": self.source_side.unmirror,
            "mirror_ok": self.replica_side.mirror_ok,
            "mirror_err": self.replica_side.mirror_err,
            "rdma": self.rdma.on_ctrl,
        }
        if not self.enabled:
            self._r = self._w = -1
            return
        self._r, self._w = os.pipe()
        os.set_blocking(self._r, False)
        os.set_blocking(self._w, False)
        self.links.start()
        self.spawn(self.replica_side.credit_loop, "peer-credits")

    # -- plumbing --------------------------------------------------------------------------------
    def spawn(self, target, name, *args) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        t.start()
        self._threads.append(t)

    def call_soon(self, fn: Callable, *args) -> None:
        """Run ``fn(*args)`` on the main thread (from any thread)."""
        self._events.put((fn, args))
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
                fn, args = self._events.get_nowait()
            except queue.Empty:
                return
            try:
                fn(*args)
            except Exception:
                log.exception("peer event %s failed", getattr(fn, "__name__", fn))

    # -- links (events) ----------------------------------------------------------------------------
    def link_up(self, link: Link) -> None:
        if not self.links.keep(link):
            return
        self._announce()   # bring the others up to date first: the new link gets it all
        self.links.add(link)
        self.directory.link_up(link.remote)
        self._send_dir(link, full=True)
        self.replica_side.request_mirrors()

    def link_down(self, link: Link) -> None:
        if not self.links.remove(link):
            return   # a duplicate we closed before it was ever used
        if self.links.kept(link.remote) is None:
            self.directory.link_down(link.remote, time.monotonic())
        self.source_side.link_down(link)
        self.replica_side.link_down(link)

    # -- control messages --------------------------------------------------------------------------
    def on_link_ctrl(self, link: Link, obj: dict) -> None:
        """A control message arrived (the link's reader thread).  An RDMA guard acknowledgement
        is handed to the mirror waiting for it at once; everything else goes to the main
        thread (``_ctrl``)."""
        if obj["t"] == "rdma" and obj.get("k") == "guard":
            try:
                self.rdma.on_guard(link, obj)
            except (KeyError, TypeError, ValueError) as exc:
                raise LinkError("protocol", f"malformed 'rdma' guard message: "
                                            f"{type(exc).__name__}: {exc}") from None
            return
        self.call_soon(self._ctrl, link, obj)

    def _ctrl(self, link: Link, obj: dict) -> None:
        if link.id not in self.links.up:
            return
        handler = self.CONTROL.get(obj["t"])
        if handler is None:
            self._violation(link, f"unknown control message {obj['t']!r}")
            return
        try:
            handler(link, obj)
        except (KeyError, TypeError, ValueError) as exc:
            self._violation(link, f"malformed {obj['t']!r} message: {type(exc).__name__}: {exc}")

    def _violation(self, link: Link, message: str, reason: str = "protocol") -> None:
        self.links.refused(f"{link.remote} ({link.addr})", Exception(message), reason)
        link.close()

    # -- the directory -----------------------------------------------------------------------------
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
        self.replica_side.reconcile()
        known = self.directory.nodes.get(link.remote, {})
        for name in touched | set(channels):
            if before.get(name) != _interest(known.get(name)):
                self.source_side.follow_interest(name)
        self.replica_side.request_mirrors()

    def _send_dir(self, link: Link, full: bool, changed: dict | None = None,
                  gone: list | None = None) -> None:
        entries = self.directory.announced() if full else (changed or {})
        link.send_ctrl({"t": "dir", "node": self.node, "full": full,
                        "channels": {n: e.wire() for n, e in entries.items()},
                        "gone": [] if full else (gone or [])})

    def _announce(self) -> None:
        changed, gone = self.directory.delta(self._local_directory())
        if changed or gone:
            for link in self.links.up.values():
                self._send_dir(link, full=False, changed=changed, gone=gone)

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
                         self.source_side.stream_id(rec), rec.max_publishers, subscribed)
        return Entry(rec.mode, rec.capacity, tail, seq, OPEN, publishers=rec.max_publishers,
                     subscribed=subscribed)

    def find_publisher(self, name: str) -> tuple[Link | None, Entry | None]:
        """The live link to the node that publishes ``name`` (the first by node name when two
        published it before they heard of each other) and its announcement."""
        for node, entry in self.directory.publishers(name):
            link = self.links.kept(node)
            if link is not None:
                return link, entry
        return None, None

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

    # -- what the daemon asks ----------------------------------------------------------------------
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
            self.source_side.hold_for_interest(rec, rec.name)

    def on_subscribe(self, rec) -> None:
        if not self.enabled:
            return
        self.replica_side.on_subscribe(rec.name)
        # Interest is announced at once, not at the next tick: the publishing node holds its
        # ring for this subscriber from the moment it hears of it (docs/peering.md, "Interest").
        e = self._entry(rec.name, rec)
        if e is not None and self.directory.note(rec.name, e):
            for link in self.links.up.values():
                self._send_dir(link, full=False, changed={rec.name: e})

    # -- periodic ----------------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        if not self.enabled:
            return
        self._announce()
        for node in self.directory.expired(now, self.s.peer_forget_after):
            self._forget_node(node)
        self.replica_side.reconcile()
        self.source_side.expire(now)
        self.replica_side.maintain(now)

    def _forget_node(self, node: str) -> None:
        """``node`` had no link for ``peer_forget_after``: it left the cluster.  Its replicas
        here become plain local channels (subscribers keep them; a new publisher anywhere takes
        the channel over), and its held mirror slots are released."""
        self.counters["nodes_forgotten"] += 1
        self.links.seen_nodes.discard(node)
        log.warning("peer %s: no link for peer_forget_after=%.1fs; forgetting it", node,
                    self.s.peer_forget_after)
        self.replica_side.forget_node(node)
        self.source_side.forget_node(node)

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
        if name in self.replica_side.conflicts:
            desc["conflict"] = self.replica_side.conflicts[name]
            desc["node"] += " (conflict: " + self.replica_side.conflicts[name].split(": ")[0] + ")"
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
        return {"node": self.node, "enabled": self.enabled, "listen": self.links.listen_addr,
                "peers": list(self.s.peers), "peer_dns": self.s.peer_dns,
                "transport": self.transport_kind,
                "rdma": self.rdma_reason or "available",
                "counters": dict(self.counters),
                "links": [lk.describe() for lk in self.links.up.values()],
                "directory": {"nodes": sorted(self.directory.nodes), "entries":
                              self.directory.size(),
                              "down": sorted(self.directory.down_since)},
                "conflicts": dict(self.replica_side.conflicts),
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
        self.source_side.drain()
        self.stopping.set()
        self.source_side.stop_all()
        self.links.close()
        self.source_side.join()
        for t in self._threads:
            t.join(0.5)
        self.rdma.shutdown()
        self.replica_side.close()
        os.close(self._r)
        os.close(self._w)
