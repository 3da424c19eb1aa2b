"""The control operations on channels and on the node: ping, hello, open (and create), publish,
unpublish, members, subscribe, unsubscribe, close, list, stat, delete (spec/control.md).  Each
checks its fields, asks ``callers`` whether the client may, and changes the registry; what a
peer holds elsewhere is asked of the peer module.

It must never write a ring word (the registry owns them), never reply to a request itself
(``dispatch`` does: a handler returns its result or raises a ShimmyError naming the rule), never
act for a client that ``callers`` has not named by its token, and never open, create, publish,
subscribe or delete without the access check.
"""

from __future__ import annotations

import dataclasses
import os
import time
from typing import TYPE_CHECKING, Callable

from shimmy import ring
from shimmy.errors import ChannelConflict, ChannelNotFound, InvalidArgument, LimitExceeded
from shimmy.names import object_token, validate_name
from shimmy.protocol import PROTOCOL_VERSION

from .dispatch import ID_MAX, field, show
from .quotas import tenant
from .records import is_member_alias
from .sessions import Client

if TYPE_CHECKING:
    from .server import Daemon

PID_MAX = 1 << 22          # Linux pid_max ceiling (PID_MAX_LIMIT)


class Operations:
    def __init__(self, d: Daemon):
        self.d = d
        self.settings, self.registry, self.segments = d.settings, d.registry, d.segments
        self.access, self.callers, self.quotas = d.access, d.callers, d.quotas
        self.sessions, self.peer, self.recordings = d.sessions, d.peer, d.recordings
        self.streams = d.streams

    def ops(self) -> dict[str, Callable[[dict], dict]]:
        return {
            "ping": self.op_ping, "hello": self.op_hello, "open": self.op_open,
            "publish": self.op_publish, "unpublish": self.op_unpublish,
            "subscribe": self.op_subscribe, "unsubscribe": self.op_unsubscribe,
            "close": self.op_close, "list": self.op_list, "stat": self.op_stat,
            "delete": self.op_delete, "members": self.op_members,
        }

    def op_ping(self, req: dict) -> dict:
        return {"pid": os.getpid(), "uptime": time.time() - self.d.started,
                "protocol": PROTOCOL_VERSION}

    def op_hello(self, req: dict) -> dict:
        pid = field(req, "pid", int, lo=1, hi=PID_MAX)
        conn = self.d.dispatch.conn
        uid = conn.uid if conn is not None else None
        who = conn.tenant if conn is not None else tenant(None, None)
        if len(self.sessions.clients) >= self.settings.max_clients:
            raise LimitExceeded(f"max_clients ({self.settings.max_clients}) clients attached")
        self.quotas.check("sessions", who, self.sessions.count(who))
        client = self.sessions.new_client(pid, who, uid)
        self.callers.tenants[client.id] = who
        self.d.counters["clients_total"] += 1
        return {"client": client.id, "token": client.token, "session": self.sessions.path,
                "heartbeat_interval": self.settings.heartbeat_interval,
                "lease_timeout": self.settings.lease_timeout,
                "protocol": PROTOCOL_VERSION, "ring_format": ring.LAYOUT_VERSION}

    def op_open(self, req: dict) -> dict:
        client = self.callers.client(req)
        name = validate_name(req.get("name"))
        mode = field(req, "mode", str, optional=True)
        capacity = field(req, "capacity", int, optional=True, lo=1, hi=ring.MAX_CAPACITY)
        create = field(req, "create", bool, optional=True)
        create = True if create is None else create
        pubs = field(req, "max_publishers", int, optional=True, lo=1,
                     hi=ring.MAX_PUBLISHERS_LIMIT)
        if is_member_alias(name):
            raise InvalidArgument(f"channel name {name!r} is reserved: a last segment '.p<id>."
                                  f"<node>' names a publisher's ring of a multi-publisher "
                                  f"channel; open that channel instead")
        if name in self.registry.channels:
            self.callers.authorize(client, "open", name, self.callers.owner(name))
            rec = self.registry.open(client.id, name, mode, capacity, create, pubs)
        elif not create:
            raise ChannelNotFound(f"channel {name!r} does not exist")
        else:
            rec = self._create_channel(client, name, mode, capacity, create, pubs)
        return {"shm": rec.shm_name, "sem_prefix": self.segments.sem_prefix(rec.token),
                "room_sem": rec.room_sem, "mode": ring.MODE_NAMES[rec.mode],
                "capacity": rec.capacity,
                "max_message": ring.max_message_size(rec.capacity),
                "max_publishers": rec.max_publishers}

    def _create_channel(self, client: Client, name: str, mode, capacity, create: bool,
                        max_publishers: int | None = None):
        self.callers.policy(client).check_open(name)
        if max_publishers is None and capacity is None and self.peer.enabled:
            # An open that leaves the shape to the channel, of a name a peer holds as a
            # publisher group: a group here too (subscribers need not know how many publishers
            # there are, or where).  Stating a capacity or max_publishers keeps the choice.
            group = self.peer.announced_group(name)
            if group is not None and mode in (None, group[0]):
                mode, capacity, max_publishers = group
        caller = self.callers.caller(client)
        who = client.tenant
        ownership = self.access.ownership_for(caller, name, who)
        cap = self.settings.default_capacity if capacity is None else capacity
        pubs = self.settings.default_max_publishers if max_publishers is None else max_publishers
        if isinstance(pubs, int) and pubs > 1:
            # A group's own ring is made at the smallest capacity (Registry.create): its messages
            # live in its publishers' member rings, each charged when it attaches (op_publish).
            cap = ring.MIN_CAPACITY
        try:
            size = ring.segment_size(cap, self.settings.max_subscribers)
        except (ValueError, OverflowError):
            size = 0   # an invalid capacity: the registry names the rule
        self.callers.check_create_quota(who, size)
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
        self.callers.owners[name] = (rec, ownership)
        self.recordings.on_created(rec)   # a recorded channel continues its numbering
        return rec

    def op_close(self, req: dict) -> dict:
        client = self.callers.client(req)
        rec = self._channel(req)
        rec.holders.discard(client.id)
        key = field(req, "key", int, optional=True, lo=0, hi=ID_MAX)
        self.registry.release_publisher(rec, client.id, key)
        if not rec.holders:
            rec.idle_since = time.monotonic()
        return {}

    def op_publish(self, req: dict) -> dict:
        client = self.callers.client(req)
        rec = self._channel(req)
        self.callers.authorize(client, "publish", rec.name, self.callers.owner(rec.name))
        self.peer.check_publish(rec)  # one publisher cluster-wide: names the node holding it
        key = field(req, "key", int, optional=True, lo=0, hi=ID_MAX) or 0
        carry = field(req, "carry", dict, optional=True)   # Channel.reopen
        size = 0
        if rec.group and not any(m.client == client.id and m.key == key
                                 for m in rec.members.values()):
            # A new member ring: its bytes are the publisher's tenant's, like a channel it made
            # (so attaching many publishers cannot go past quota_shm_bytes).
            size = ring.segment_size(rec.capacity, rec.max_subscribers)
            self.quotas.check("shm_bytes", client.tenant,
                              self.callers.tenant_usage(client.tenant)[1], size)
        member = self.registry.grant_publisher(rec, client.id, client.pid or client.claimed_pid,
                                               key)
        if member is None:
            if carry is not None:
                self.peer.source_side.carry(rec, carry)   # the empty ring where its stream left off
            return {}
        self.peer.source_side.hold_member(rec.name, member.rec)  # peers with the group get it all
        if size:   # counted by tenant_usage while the member ring lives (not as a channel)
            own = self.callers.owner(rec.name) or self.segments.ownership(rec.token)
            if own is not None:
                self.callers.owners[member.rec.name] = (member.rec, dataclasses.replace(
                    own, principal=client.tenant, size=size, member=True))
        return {"member": {"id": member.publisher, "shm": member.shm_name,
                           "room_sem": member.rec.room_sem, "node": self.peer.node}}

    def op_unpublish(self, req: dict) -> dict:
        client = self.callers.client(req)
        rec = self._channel(req)
        key = field(req, "key", int, optional=True, lo=0, hi=ID_MAX)
        self.registry.release_publisher(rec, client.id, key)
        return {}

    def op_members(self, req: dict) -> dict:
        """A subscriber of a multi-publisher channel saw the group epoch change: the member
        rings its slot reads now (spec/control.md)."""
        client = self.callers.client(req)
        rec = self._channel(req)
        index = field(req, "slot", int, lo=0, hi=rec.max_subscribers - 1)
        slot = rec.slots.get(index) or rec.evicted.get(index)
        if slot is None or slot.client != client.id:
            raise InvalidArgument(f"channel {rec.name!r}: slot {index} is not yours")
        return {"epoch": rec.view.u32[ring.I_GROUP_EPOCH],
                "members": self.registry.members_for(rec, index)}

    def op_subscribe(self, req: dict) -> dict:
        client = self.callers.client(req)
        rec = self._channel(req)
        self.callers.authorize(client, "subscribe", rec.name, self.callers.owner(rec.name))
        start = field(req, "start", str, optional=True) or "next"
        held = sum(1 for ch in self.registry.channels.values()
                   for table in (ch.slots, ch.evicted) for slot in table.values()
                   if self.callers.tenants.get(slot.client) == client.tenant)
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
        client = self.callers.client(req)
        rec = self._channel(req)
        slot = field(req, "slot", int, lo=0, hi=rec.max_subscribers - 1)
        self.registry.remove_subscriber(rec, slot, client.id)
        return {}

    def op_list(self, req: dict) -> dict:
        channels, hidden = self._channels_for(req)
        return {"channels": channels, "hidden": hidden,
                "remote": self.peer.remote_channels(), "node": self.peer.node,
                "streams": self.streams.describe(self.callers.visible(req)),
                "finished_streams": self.streams.finished_for(self.callers.visible(req))}

    def op_stat(self, req: dict) -> dict:
        channels, hidden = self._channels_for(req)
        who = self.callers.visible(req)
        clients = [c.describe() for c in self.sessions.clients.values()
                   if who is None or (who is not False and c.uid == who.uid)]
        return {"pid": os.getpid(), "uptime": time.time() - self.d.started,
                "socket": self.d.socket_path,
                "counters": {**self.d.counters, **self.sessions.counters,
                             **self.d.control.counters, **self.registry.counters,
                             **self.streams.counters},
                "shm_allocated": self.segments.allocated,
                "nofile": {"soft": self.d.nofile[0], "hard": self.d.nofile[1]},
                "orphans": len(self.d.departures.orphans),
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
        client = self.callers.client(req)
        self.callers.policy(client).check("publish", name)  # deleting is a publisher's act
        kind = req.get("kind")
        if kind not in (None, "channel", "stream"):
            raise InvalidArgument(f"delete kind must be 'channel' or 'stream', got {show(kind)}")
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
            self.access.check(self.callers.caller(client), "delete", name, self.callers.owner(name))
        self.registry.delete(name)
        self.callers.owners.pop(name, None)
        return {}

    def _channel(self, req: dict):
        return self.registry.get(validate_name(req.get("name")))

    def _channels_for(self, req: dict) -> tuple[list[dict], int]:
        who = self.callers.visible(req)
        shown, hidden = [], 0
        now = time.monotonic()
        for rec in self.registry.channels.values():
            if rec.group_of is not None:
                continue   # a member ring: listed under its channel's publishers
            if who is None or (who is not False and self.access.allows(
                    who, "stat", rec.name, self.callers.owner(rec.name))):
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
