"""What ``shimmy stat`` and ``shimmy top`` show: the daemon's ``stat`` reply as rich tables.

Everything here is a pure function of one or two ``stat`` replies, so the same rendering serves
the live view (``top`` on a terminal) and the plain snapshot (``stat``, ``top --once``, or any
command whose stdout is a pipe).  Nothing here talks to the daemon or writes anywhere but the
console it is given.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from rich.console import Console, Group, RenderableType
from rich.table import Table
from rich.text import Text

_BYTE_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")


class PipeAwareConsole(Console):
    """A closed stdout surfaces as BrokenPipeError, which the command line ends quietly on
    (rich's own handling exits with status 1)."""

    def on_broken_pipe(self) -> None:
        self.quiet = True
        raise BrokenPipeError(errno.EPIPE, "stdout closed")


def console_for_stdout() -> Console:
    """The terminal's console; on a pipe or file, no colour and a width that never wraps rows."""
    console = PipeAwareConsole()
    if not console.is_terminal:
        console = PipeAwareConsole(width=200, no_color=True, highlight=False)
    return console


def human_bytes(n: float) -> str:
    """``4194304`` -> ``"4.0 MiB"``; whole bytes below 1 KiB (``"1000 B"``)."""
    n = float(n)
    for unit in _BYTE_UNITS:
        if abs(n) < 1024 or unit == _BYTE_UNITS[-1]:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_count(n: float) -> str:
    """``12345`` -> ``"12.3k"``: counts and rates at a glance (exact below 10,000)."""
    if abs(n) < 10_000:
        return f"{n:.0f}" if float(n).is_integer() or abs(n) >= 100 else f"{n:.1f}"
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def human_duration(seconds: float) -> str:
    """``151.2`` -> ``"2m 31s"``; ``90061`` -> ``"1d 1h 1m"``."""
    s = int(seconds)
    if s < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{s}s"
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h {minutes}m"
    if hours:
        return f"{hours}h {minutes}m {s}s"
    return f"{minutes}m {s}s"


def rdma_state(stat: dict) -> tuple[str, str]:
    """(state, why): ``off`` (no peering), ``unavailable`` (and why), ``idle`` (a device, links on
    TCP) or ``active`` (a mirror runs over RDMA).  Prefers the daemon's own ``rdma`` entry."""
    own = stat.get("rdma")
    if isinstance(own, dict) and "state" in own:
        return str(own["state"]), str(own.get("why", ""))
    peer = stat.get("peer") or {}
    if not peer.get("enabled"):
        return "off", "peering is off (no peer_listen, peers or peer_dns)"
    if any(m.get("transport") == "rdma" for m in peer.get("mirrors", ())):
        return "active", "mirrors over RDMA"
    reason = str(peer.get("rdma", ""))
    if reason and reason != "available":
        return "unavailable", reason
    return "idle", "device found, links on TCP"


# -- one channel's figures ------------------------------------------------------------------------
@dataclass
class ChannelRow:
    name: str
    mode: str
    capacity: int
    published: int
    msg_rate: float | None      # messages/s since the previous sample (None: first sample)
    byte_rate: float | None
    fill: float                 # share of the ring the slowest subscriber has not read yet
    subscribers: int
    max_lag: int                # bytes behind the publisher, slowest subscriber
    lapped: int                 # lossy: bytes overwritten before the slowest subscriber read them
    publisher: bool
    node: str


def channel_rows(stat: dict, prev: dict | None, dt: float) -> list[ChannelRow]:
    before = {c["name"]: c for c in (prev or {}).get("channels", ())}
    rows = []
    for ch in stat.get("channels", ()):
        tail, head, cap = ch.get("tail", 0), ch.get("head", 0), ch["capacity"]
        positions = [s["position"] for s in ch.get("subscribers", ())]
        slowest = min(positions, default=tail)
        old = before.get(ch["name"])
        msg_rate = byte_rate = None
        if old is not None and dt > 0:
            msg_rate = max(ch["published"] - old["published"], 0) / dt
            byte_rate = max(tail - old.get("tail", 0), 0) / dt
        node = ch.get("node", "")
        if "replica" in ch:
            node = f"{node} (replica)"
        rows.append(ChannelRow(
            name=ch["name"], mode=ch["mode"], capacity=cap, published=ch["published"],
            msg_rate=msg_rate, byte_rate=byte_rate,
            fill=min(max(tail - slowest, 0) / cap, 1.0) if cap else 0.0,
            subscribers=len(positions), max_lag=max(tail - slowest, 0),
            lapped=max(head - slowest, 0) if ch["mode"] == "lossy" else 0,
            publisher=ch.get("publisher") is not None, node=node))
    rows.sort(key=lambda r: (-(r.byte_rate or 0.0), -(r.msg_rate or 0.0), r.name))
    return rows


def _rate(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    return f"{human_bytes(value)}/s" if unit == "B" else f"{human_count(value)}/s"


def _table(title: str, *columns: str) -> Table:
    table = Table(title=title, title_justify="left", title_style="bold", box=None,
                  header_style="bold", pad_edge=False, expand=False)
    for col in columns:
        table.add_column(col, justify="left" if col in ("CHANNEL", "STREAM", "NODE", "ADDR",
                                                         "MODE", "STATE", "FROM", "TO",
                                                         "TRANSPORT", "NAME", "WHAT") else "right",
                         no_wrap=True)
    return table


# -- the views ------------------------------------------------------------------------------------
def header(stat: dict) -> Text:
    rdma, why = rdma_state(stat)
    clients = stat.get("clients", ())
    peer = stat.get("peer") or {}
    text = Text()
    text.append("shimmy daemon", style="bold")
    text.append(f"  pid {stat.get('pid')}  up {human_duration(stat.get('uptime', 0))}"
                f"  socket {stat.get('socket')}\n")
    text.append(f"node {peer.get('node') or '-'}  clients {len(clients)}"
                f"  shared memory {human_bytes(stat.get('shm_allocated', 0))}"
                f"  peering {'on' if peer.get('enabled') else 'off'}"
                f"  rdma {rdma}" + (f": {why}" if why else ""))
    return text


def channels_table(rows: list[ChannelRow], limit: int | None = None) -> Table:
    table = _table(f"Channels ({len(rows)})", "CHANNEL", "MODE", "MSG/S", "BYTES/S", "PUBLISHED",
                   "CAPACITY", "FILL", "SUBS", "MAX LAG", "LAPPED", "NODE")
    for r in rows[:limit]:
        table.add_row(r.name, r.mode, _rate(r.msg_rate, "msg"), _rate(r.byte_rate, "B"),
                      human_count(r.published), human_bytes(r.capacity), f"{100 * r.fill:.0f}%",
                      str(r.subscribers), human_bytes(r.max_lag),
                      human_bytes(r.lapped) if r.mode == "lossy" else "-", r.node or "-")
    return table


def orphan_cell(st: dict) -> str:
    """How long a finished stream has waited for a reader, and when the daemon frees it."""
    waited = st.get("orphaned_for")
    if waited is None:
        return "-"
    freed_in = st.get("freed_in")
    then = "kept" if freed_in is None else f"freed in {human_duration(freed_in)}"
    return f"{human_duration(waited)}, {then}"


STREAM_COLUMNS = ("STREAM", "CAPACITY", "BUFFERED", "WRITTEN", "WRITER", "READER", "EOF",
                  "NO READER FOR")


def stream_cells(st: dict) -> tuple[str, ...]:
    """One stream of the daemon's listing as the cells of STREAM_COLUMNS (``ls`` and ``top``)."""
    ends = [f"pid {e['pid']} ({e['state']})" if e else "-" for e in (st["writer"], st["reader"])]
    return (st["name"], human_bytes(st["capacity"]), human_bytes(st["buffered"]),
            human_bytes(st["written"]), *ends, "yes" if st["eof"] else "-", orphan_cell(st))


def streams_table(stat: dict) -> Table:
    table = _table(f"Streams ({len(stat.get('streams', ()))})", *STREAM_COLUMNS)
    for st in stat.get("streams", ()):
        table.add_row(*stream_cells(st))
    return table


def peer_tables(stat: dict, prev: dict | None, dt: float) -> list[Table]:
    peer = stat.get("peer") or {}
    if not peer.get("enabled"):
        return []
    old = prev.get("peer") or {} if prev else {}

    def rate(item: dict, olds: list[dict], key: str, field: str) -> float | None:
        match = next((o for o in olds if o.get(key) == item.get(key)), None)
        if match is None or dt <= 0:
            return None
        return max(item.get(field, 0) - match.get(field, 0), 0) / dt

    links = _table(f"Peer links ({len(peer.get('links', ()))})", "NODE", "ADDR", "STATE", "UP",
                   "SENT/S", "RECEIVED/S", "SENT", "RECEIVED")
    for lk in peer.get("links", ()):
        links.add_row(str(lk.get("node")), str(lk.get("addr")),
                      ("dialed" if lk.get("dialed") else "accepted")
                      + (", tls" if lk.get("tls") else ""),
                      human_duration(lk.get("up_s", 0)),
                      _rate(rate(lk, old.get("links", []), "node", "bytes_sent"), "B"),
                      _rate(rate(lk, old.get("links", []), "node", "bytes_received"), "B"),
                      human_bytes(lk.get("bytes_sent", 0)),
                      human_bytes(lk.get("bytes_received", 0)))
    mirrors = _table(f"Mirrors ({len(peer.get('mirrors', ()))} out, "
                     f"{len(peer.get('replicas', ()))} in)", "CHANNEL", "WHAT", "NODE",
                     "STATE", "TRANSPORT", "BYTES/S", "LAG", "GAPS", "RECONNECTS")
    for m in peer.get("mirrors", ()):
        state = "running" if m.get("running") else f"stopped {m.get('error') or ''}".strip()
        mirrors.add_row(m["name"], "to", str(m.get("to")), state, str(m.get("transport", "-")),
                        _rate(rate(m, old.get("mirrors", []), "name", "bytes"), "B"),
                        human_bytes(m.get("lag_bytes", 0)), str(m.get("gaps", 0)), "-")
    for rp in peer.get("replicas", ()):
        mirrors.add_row(rp["name"], "from", str(rp.get("from")),
                        f"{rp.get('state')}, link {rp.get('link')}", "-",
                        _rate(rate(rp, old.get("replicas", []), "name", "tail"), "B"),
                        human_bytes(rp.get("lag_bytes", 0)), "-", str(rp.get("reconnects", 0)))
    return [links, mirrors]


def counters_table(stat: dict) -> Table:
    table = _table("Counters", "WHAT", "COUNT", "WHAT", "COUNT")
    items = list((stat.get("counters") or {}).items())
    peer = stat.get("peer") or {}
    if peer.get("enabled"):
        items += [(f"peer.{k}", v) for k, v in (peer.get("counters") or {}).items()]
    half = (len(items) + 1) // 2
    for left, right in zip(items[:half], items[half:] + [("", "")], strict=False):
        table.add_row(left[0], str(left[1]), right[0], str(right[1]))
    return table


def stat_summary(stat: dict) -> RenderableType:
    """``shimmy stat``: the daemon at a glance (``--json`` gives the reply itself)."""
    parts: list[RenderableType] = [header(stat), Text(""), counters_table(stat), Text("")]
    parts.append(channels_table(channel_rows(stat, None, 0.0)))
    if stat.get("streams"):
        parts += [Text(""), streams_table(stat)]
    for table in peer_tables(stat, None, 0.0):
        parts += [Text(""), table]
    return Group(*parts)


def top_view(stat: dict, prev: dict | None, dt: float, *, rows: int | None = None,
             note: str = "") -> RenderableType:
    """``shimmy top``: channels by traffic (rates from two samples ``dt`` apart), then peers."""
    parts: list[RenderableType] = [header(stat)]
    if note:
        parts.append(Text(note, style="yellow"))
    parts += [Text(""), channels_table(channel_rows(stat, prev, dt), rows)]
    for table in peer_tables(stat, prev, dt):
        parts += [Text(""), table]
    if stat.get("streams"):
        parts += [Text(""), streams_table(stat)]
    return Group(*parts)
