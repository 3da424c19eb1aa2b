"""The cluster directory: which channel names every peer node holds, and in what role.

Kept apart from links and mirrors: this module knows node names, channel names and announcements,
never sockets or rings.  Each node announces every channel it holds (docs/peering.md, "Names"):

* ``open``: the name is open on that node (subscribers or a silent publisher) and nobody has
  published it there;
* ``published``: that node is the channel's source (a publisher holds it, or it holds messages);
* ``replica``: that node mirrors the channel from ``source``; its tail and sequence number are
  what a restarted source continues from.

Each entry also says whether the name has a live subscriber on that node (``subscribed``): the
*interest* for which a publishing node holds its ring until that node's mirror asks
(docs/peering.md, "Interest").

Announcements are deltas (``dir`` with the changed entries and the names gone) after a full one
on link-up, so an idle cluster sends nothing and a busy channel sends one small entry per tick.
Entries of a node whose link is down are kept (``ls`` shows them, a returning node finds its
replicas' positions) until ``peer_forget_after`` seconds without a link: then the node is
forgotten.
"""

from __future__ import annotations

from dataclasses import dataclass

from shimmy import ring

OPEN, PUBLISHED, REPLICA = 0, 1, 2
KIND_NAMES = {OPEN: "open", PUBLISHED: "published", REPLICA: "replica"}
MAX_NODE_NAME = 255


class BadAnnouncement(ValueError):
    """A ``dir`` message that does not follow the format; the link is dropped."""


@dataclass(frozen=True)
class Entry:
    mode: int
    capacity: int
    tail: int
    seq: int
    kind: int
    source: str = ""      # for replicas: the node the channel is published on
    stream: int = 0       # which stream (one per ring a source created; a continued one keeps it)
    publishers: int = 1   # the channel's max_publishers (> 1: a publisher group)
    subscribed: int = 0   # 1: a live subscriber holds the name on that node (interest)

    def wire(self) -> list:
        return [self.mode, self.capacity, self.tail, self.seq, self.kind, self.source, self.stream,
                self.publishers, self.subscribed]

    def shape(self) -> tuple:
        """What matters for routing: everything but the moving tail and sequence number."""
        return self.mode, self.capacity, self.kind, self.source, self.publishers


def parse_entry(name, value) -> Entry:
    # 7 fields from a daemon without publisher groups, 8 with (max_publishers), 9 with the
    # interest flag (subscribed).
    if not isinstance(name, str) or not isinstance(value, (list, tuple)) or \
            len(value) not in (7, 8, 9):
        raise BadAnnouncement(f"bad directory entry {name!r}")
    mode, capacity, tail, seq, kind, source, stream, *more = value
    publishers = more[0] if more else 1
    subscribed = more[1] if len(more) > 1 else 0
    if mode not in ring.MODE_NAMES or kind not in KIND_NAMES or not isinstance(source, str) \
            or len(source) > MAX_NODE_NAME or not all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0
                for x in (capacity, tail, seq, stream, publishers)) \
            or not 1 <= publishers <= ring.MAX_PUBLISHERS_LIMIT or subscribed not in (0, 1):
        raise BadAnnouncement(f"bad directory entry {name!r}")
    return Entry(mode, capacity, tail, seq, kind, source, stream, publishers, subscribed)


def shape_conflict(name: str, node: str, e: Entry, mode: int | None,
                   capacity: int | None) -> str | None:
    """Why a channel ``name`` of ``mode`` and ``capacity`` here (None: not stated) cannot take the
    stream ``node`` announces as ``e``, or None when it can."""
    if mode is not None and mode != e.mode:
        return (f"channel {name!r} is published on node {node!r} with "
                f"mode={ring.MODE_NAMES[e.mode]!r}; here mode={ring.MODE_NAMES[mode]!r}")
    if capacity is not None and capacity != e.capacity:
        return (f"channel {name!r} is published on node {node!r} with capacity={e.capacity}; "
                f"here capacity={capacity}")
    return None


class Directory:
    def __init__(self) -> None:
        self.nodes: dict[str, dict[str, Entry]] = {}     # node -> name -> entry
        self.down_since: dict[str, float] = {}            # nodes without a link, since when
        self._announced: dict[str, Entry] = {}            # what our peers last heard from us

    # -- what peers announce ---------------------------------------------------------------------
    def apply(self, node: str, full: bool, channels: dict[str, Entry], gone: list) -> None:
        known = self.nodes.setdefault(node, {})
        if full:
            known.clear()
        known.update(channels)
        for name in gone:
            known.pop(name, None)

    def link_up(self, node: str) -> None:
        self.down_since.pop(node, None)

    def link_down(self, node: str, now: float) -> None:
        if node in self.nodes:
            self.down_since.setdefault(node, now)

    def expired(self, now: float, forget_after: float) -> list[str]:
        """Nodes without a link for ``forget_after`` seconds; they are removed."""
        gone = [n for n, t in self.down_since.items() if now - t >= forget_after]
        for node in gone:
            del self.down_since[node]
            self.nodes.pop(node, None)
        return gone

    def publishers(self, name: str, up_only: bool = True) -> list[tuple[str, Entry]]:
        """Nodes announcing ``name`` as published, by node name (the first one is the one
        followed when two nodes published it before they heard of each other)."""
        out = []
        for node in sorted(self.nodes):
            if up_only and node in self.down_since:
                continue
            e = self.nodes[node].get(name)
            if e is not None and e.kind == PUBLISHED:
                out.append((node, e))
        return out

    def replicas_of(self, name: str, source: str) -> list[tuple[str, Entry]]:
        """Live nodes holding a replica of ``name`` fed by ``source``."""
        return [(node, chans[name]) for node, chans in sorted(self.nodes.items())
                if node not in self.down_since and name in chans
                and chans[name].kind == REPLICA and chans[name].source == source]

    def holders(self, name: str) -> dict[str, Entry]:
        """Every node announcing ``name``, with its entry (live or not)."""
        return {node: chans[name] for node, chans in self.nodes.items() if name in chans}

    def interested(self, name: str, source: str) -> list[str]:
        """Live nodes with interest in ``name`` as published by ``source``: a live subscriber
        there, on the name open (waiting for a publisher) or on a replica fed by ``source``.
        A node whose link is down is not counted: it gets what the ring holds when it is back,
        the gap counted (docs/peering.md, "Interest")."""
        out = []
        for node, chans in sorted(self.nodes.items()):
            e = chans.get(name)
            if e is not None and e.subscribed and node not in self.down_since and \
                    (e.kind == OPEN or (e.kind == REPLICA and e.source == source)):
                out.append(node)
        return out

    def names(self) -> dict[str, list[tuple[str, Entry]]]:
        """Every name peers announced: name -> [(node, entry)]."""
        out: dict[str, list[tuple[str, Entry]]] = {}
        for node, chans in sorted(self.nodes.items()):
            for name, e in chans.items():
                out.setdefault(name, []).append((node, e))
        return out

    def size(self) -> int:
        return sum(len(c) for c in self.nodes.values())

    # -- what we announce --------------------------------------------------------------------------
    def delta(self, current: dict[str, Entry]) -> tuple[dict[str, Entry], list[str]]:
        """Entries changed since the last announcement, names gone; remembers ``current``."""
        changed = {n: e for n, e in current.items() if self._announced.get(n) != e}
        gone = [n for n in self._announced if n not in current]
        self._announced = dict(current)
        return changed, gone

    def note(self, name: str, entry: Entry) -> bool:
        """Remember ``entry`` as announced for ``name`` (sent at once, outside the tick's
        delta); whether it differs from what was announced before."""
        changed = self._announced.get(name) != entry
        self._announced[name] = entry
        return changed

    def announced(self) -> dict[str, Entry]:
        return dict(self._announced)
