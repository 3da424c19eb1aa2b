"""Prometheus metrics for the daemon (``metrics_listen = "HOST:PORT"``; off when empty).

Nothing on the data path feeds these numbers.  At scrape time a custom collector, running in
the exporter's HTTP thread, reads the words the rings already keep in shared memory (tail,
head, the sequence number of the frame at ``last``, subscriber positions, the publisher's
back-pressure wait count, each subscriber's lost count) and copies the daemon's own
bookkeeping (client table, peer links, mirrors).  Publishers and subscribers pay nothing for
being observed.

Thread safety.  The daemon's state belongs to its loop thread and has no locks.  The collector
only takes GIL-atomic snapshots of it (``list(d.values())``, ``dict(counters)``: one C call
each, which no other Python thread can interleave with) and then reads shared-memory words
through the views the daemon already holds.  It never creates a new buffer export of a mapping
(that would make the loop thread's ``mmap.close`` fail); a view the loop thread released in the
meantime raises ValueError, and that channel is simply left out of this scrape.

Label sets are bounded: ``channel`` by ``max_channels``, ``peer`` by ``peer_max_links``, ``op``
by the daemon's operation table, ``code`` by the error classes of shimmy.errors.  Subscribers
are aggregated per channel (never a label per client).
"""

from __future__ import annotations

import logging
import socket
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIRequestHandler, make_server

from shimmy import ring

from .logformat import Throttle
from .sessions import RESOURCE_ERRNOS
from .setting_values import parse_listen

if TYPE_CHECKING:
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

# prometheus-client (the `metrics` extra) is imported only when metrics_listen is set: the daemon
# runs without it, and a daemon asked to serve metrics without it says what to install.

log = logging.getLogger("shimmy.daemon")

# Label value for a request whose operation could not be read (not msgpack, no/unknown op).
OP_MALFORMED = "malformed"
CODE_INTERNAL = "internal"


class ControlStats:
    """Control requests and errors by operation and error code.  The loop thread increments;
    the exporter thread copies the dicts (GIL-atomic) at scrape time."""

    def __init__(self) -> None:
        self.requests: dict[str, int] = {}
        self.errors: dict[tuple[str, str], int] = {}

    def count(self, op: str, error_code: str | None = None) -> None:
        self.requests[op] = self.requests.get(op, 0) + 1
        if error_code is not None:
            key = (op, error_code)
            self.errors[key] = self.errors.get(key, 0) + 1


def _counter(name: str, doc: str, labels: Iterable[str] = ()) -> "CounterMetricFamily":
    from prometheus_client.core import CounterMetricFamily
    return CounterMetricFamily(name, doc, labels=list(labels))


def _gauge(name: str, doc: str, labels: Iterable[str] = ()) -> "GaugeMetricFamily":
    from prometheus_client.core import GaugeMetricFamily
    return GaugeMetricFamily(name, doc, labels=list(labels))


def _one(family: "CounterMetricFamily | GaugeMetricFamily", value: float) -> "Metric":
    """``family`` with its one unlabelled sample."""
    family.add_metric([], value)
    return family


def _by(family: "CounterMetricFamily | GaugeMetricFamily", samples) -> "Metric":
    """``family`` with one sample per ``(label value, value)`` of ``samples``."""
    for label, value in samples:
        family.add_metric([label], value)
    return family


def _totals(values: dict, table) -> Iterator["Metric"]:
    """One unlabelled counter per ``(key, name, doc)`` row of ``table``: ``values[key]``, 0 while
    the key is absent."""
    for key, name, doc in table:
        yield _one(_counter(name, doc), values.get(key, 0))


class _LostTally:
    """Keeps ``shimmy_channel_messages_lost_total`` monotonic although the per-slot words it is
    summed from vanish with their subscribers: the last value seen of a slot that has gone
    (by slot index and generation) moves into a retired total of its channel."""

    def __init__(self) -> None:
        self.seen: dict[str, dict[tuple[int, int], int]] = {}
        self.retired: dict[str, int] = {}

    def total(self, channel: str, current: dict[tuple[int, int], int]) -> int:
        before = self.seen.get(channel, {})
        gone = sum(v for k, v in before.items() if k not in current)
        self.retired[channel] = self.retired.get(channel, 0) + gone
        self.seen[channel] = current
        return self.retired[channel] + sum(current.values())

    def forget_except(self, channels: set[str]) -> None:
        for name in [n for n in self.seen if n not in channels]:
            self.seen.pop(name, None)
            self.retired.pop(name, None)


def _published(view: ring.RingView) -> int | None:
    """Messages committed to the ring: 1 + the sequence number of the frame at ``last``.

    The publisher writes a frame's header before it stores ``last`` (then ``tail``), so the
    header at ``last`` is valid unless the writer has overwritten it since (``head > last``,
    lossy or lapped): then read again.  Unlike ``ring.stream_point`` this needs no snapshot
    consistent with ``tail`` and so cannot be starved by a fast publisher; it is monotonic
    across scrapes because ``last`` only grows.  None when lapped every time (left out of
    this scrape).
    """
    q, base, mask = view.q, view.data_offset, view.capacity - 1
    for _ in range(16):
        if q[ring.W_TAIL] == 0:
            return 0
        last = q[ring.W_LAST]
        seq = ring.FRAME.unpack_from(view.mv, base + (last & mask))[2]
        if q[ring.W_HEAD] <= last:
            return seq + 1
    return None


class DaemonCollector:
    """Builds every metric family from the daemon's state at scrape time (a prometheus_client
    custom collector: registered with a registry, which calls ``collect`` on every scrape)."""

    def __init__(self, daemon) -> None:
        self.d = daemon
        self._lost = _LostTally()
        self._lock = threading.Lock()   # concurrent scrapes share the _LostTally

    def collect(self) -> Iterator["Metric"]:
        with self._lock:
            yield from self._daemon()
            yield from self._channels()
            yield from self._streams()
            yield from self._peering()
            yield from self._recordings()

    # -- daemon-wide ------------------------------------------------------------------------------
    def _daemon(self) -> Iterator["Metric"]:
        d = self.d
        counters = dict(d.counters)
        yield _one(_gauge("shimmy_daemon_start_time_seconds", "Unix time the daemon started"),
                   d.started)
        yield _one(_gauge("shimmy_clients", "Clients attached now"), len(d.sessions.clients))
        yield from _totals(counters, (
                ("clients_total", "shimmy_clients_attached_total", "Clients that said hello"),
                ("clients_crashed", "shimmy_clients_crashed_total",
                 "Clients that went away without closing (crash, kill, container death)"),
                ("leases_expired", "shimmy_leases_expired_total",
                 "Clients whose lease lapsed (no heartbeat within lease_timeout)"),
                ("slots_reclaimed", "shimmy_subscriber_slots_reclaimed_total",
                 "Subscriber slots freed after their client went away")))
        yield from self._listeners(counters)
        reclaimed = dict(d.registry.counters)
        yield from _totals(reclaimed, (
                ("channels_reclaimed", "shimmy_channels_reclaimed_total",
                 "Channels deleted after idle_channel_ttl or idle_channel_unread_ttl with no "
                 "ends attached"),
                ("channels_reclaimed_unread", "shimmy_channels_reclaimed_unread_total",
                 "Of those, channels deleted while their ring held unread messages "
                 "(idle_channel_unread_ttl)"),
                ("unread_bytes_dropped", "shimmy_channel_unread_bytes_dropped_total",
                 "Unread ring bytes those deletions dropped")))
        yield _one(_gauge("shimmy_shm_allocated_bytes", "Shared memory the daemon's segments take"),
                   d.segments.allocated)
        stats: ControlStats = d.control_stats
        yield _by(_counter("shimmy_control_requests_total", "Control requests by operation",
                           ["op"]), sorted(dict(stats.requests).items()))
        c = _counter("shimmy_control_errors_total",
                     "Control requests answered with an error, by operation and error code",
                     ["op", "code"])
        for (op, code), n in sorted(dict(stats.errors).items()):
            c.add_metric([op, code], n)
        yield c

    def _listeners(self, counters: dict) -> Iterator["Metric"]:
        """Each listener's refusals (docs/security.md, "A flood of local connections or
        requests")."""
        d = self.d
        session, control, peer = dict(d.sessions.counters), dict(d.control.counters), \
            dict(d.peer.counters)
        # Each row: the family, its help, then the counter's key at each listener (control,
        # session, metrics, peer; None: the peer listener has no such counter).
        for name, doc, ck, sk, mk, pk in (
                ("shimmy_connections_refused_total",
                 "Connections closed at accept for a limit (per-tenant quota, descriptors kept "
                 "for connections, metrics_max_connections, peer_max_pending), by listener",
                 "control_connections_refused", "connections_refused",
                 "metrics_connections_refused", "evicted_pending"),
                ("shimmy_accept_errors_total",
                 "accept() failures (out of descriptors or memory: accepting pauses for "
                 "accept_backoff), by listener",
                 "control_accept_errors", "accept_errors", "metrics_accept_errors",
                 "accept_errors"),
                ("shimmy_connections_timed_out_total",
                 "Connections closed for silence or an unfinished request "
                 "(control_request_timeout, session_connect_timeout, metrics_timeout), by "
                 "listener",
                 "control_connections_timed_out", "connections_timed_out",
                 "metrics_connection_errors", None)):
            values = {"control": control[ck], "session": session[sk],
                      "metrics": counters.get(mk, 0)}
            if pk is not None:
                values["peer"] = peer.get(pk, 0)
            yield _by(_counter(name, doc, ["listener"]), values.items())
        yield _one(_counter("shimmy_control_frames_refused_total",
                            "Control connections closed for a frame over request_max_bytes, an "
                            "empty frame, or bytes that are not one msgpack map"),
                   control["control_frames_refused"])

    # -- pub/sub channels -------------------------------------------------------------------------
    def _channels(self) -> Iterator["Metric"]:
        lab = ["channel"]
        fam: dict[str, "CounterMetricFamily | GaugeMetricFamily"] = {
            "channels": _gauge("shimmy_channels", "Pub/sub channels on this node"),
            "msgs": _counter("shimmy_channel_messages_published_total",
                             "Messages committed to the ring (sequence number at its tail)", lab),
            "bytes": _counter("shimmy_channel_published_bytes_total",
                              "Ring bytes committed: payload + 16-byte frame header, 16-byte "
                              "aligned, plus wrap padding", lab),
            "cap": _gauge("shimmy_channel_capacity_bytes", "Ring data capacity", lab),
            "fill": _gauge("shimmy_channel_ring_fill_ratio",
                           "Fraction of the ring holding bytes the slowest active subscriber "
                           "has not read (reliable: 1 = publisher blocked)", lab),
            "subs": _gauge("shimmy_channel_subscribers", "Subscriber slots in use by state",
                           ["channel", "state"]),
            "holders": _gauge("shimmy_channel_clients", "Clients holding the channel open", lab),
            "publisher": _gauge("shimmy_channel_publisher_attached",
                                "1 while a client holds the publisher role (a multi-publisher "
                                "channel: how many publish)", lab),
            "lag_max": _gauge("shimmy_channel_subscriber_lag_bytes_max",
                              "Bytes the slowest active subscriber is behind the tail", lab),
            "lag_sum": _gauge("shimmy_channel_subscriber_lag_bytes_sum",
                              "Bytes all active subscribers together are behind the tail", lab),
            "lost": _counter("shimmy_channel_messages_lost_total",
                             "Messages subscribers lost (lossy mode overwrote them unread), "
                             "summed over the channel's subscribers", lab),
            "waits": _counter("shimmy_channel_backpressure_waits_total",
                              "Times a reliable publisher waited for the slowest subscriber", lab),
            "link": _gauge("shimmy_channel_replica_link_up",
                           "Replica of a channel published on another node: 1 while its peer "
                           "link streams, 0 while it reconnects", lab),
        }
        recs = list(self.d.registry.channels.values())
        names = set()
        for rec in recs:
            if rec.group_of is not None:
                continue   # a member ring: counted in its channel's figures
            try:
                self._channel(rec, fam)
            except (ValueError, IndexError, ring.RingCorrupted):
                continue   # deleted (views released) or rewritten under us: next scrape
            names.add(rec.name)
        self._lost.forget_except(names)
        fam["channels"].add_metric([], len(names))
        yield from fam.values()

    def _channel(self, rec, fam: dict) -> None:
        view = rec.view
        q = view.q
        name = rec.name
        published = _published(view)
        if rec.group:   # a publisher group: its messages are in the member rings
            published = rec.reclaimed_messages + sum(
                _published(m.view) or 0 for m in list(rec.members.values()))
        tail = q[ring.W_TAIL]
        head = q[ring.W_HEAD]
        slots = list(rec.slots.values())
        evicted = list(rec.evicted.values())
        lags = [max(tail - max(q[view.slot_word(s.index)], head), 0) for s in slots]
        if rec.group:   # bytes over the member rings, each subscriber's lag its largest there
            tail = rec.reclaimed_bytes + sum(m.view.q[ring.W_TAIL]
                                             for m in list(rec.members.values()))
            lags = list(rec.member_lags().values())
        lost = {(s.index, s.generation): view.slot_lost(s.index) for s in slots + evicted}
        waits = q[ring.W_WAITS]
        link = view.link_state()
        # Everything read: now emit (a released view raised before any sample was added).
        if published is not None:
            fam["msgs"].add_metric([name], published)
        fam["bytes"].add_metric([name], tail)
        fam["cap"].add_metric([name], rec.capacity)
        fam["fill"].add_metric([name], (max(lags) if lags else 0) / rec.capacity)
        fam["subs"].add_metric([name, "active"], len(slots))
        fam["subs"].add_metric([name, "evicted"], len(evicted))
        fam["holders"].add_metric([name], len(rec.holders))
        fam["publisher"].add_metric([name], len(rec.live_publishers()) if rec.group else
                                    0 if rec.publisher is None else 1)
        fam["lag_max"].add_metric([name], max(lags) if lags else 0)
        fam["lag_sum"].add_metric([name], sum(lags))
        fam["lost"].add_metric([name], self._lost.total(name, lost))
        fam["waits"].add_metric([name], waits)
        if link != "local":
            fam["link"].add_metric([name], 1 if link == "up" else 0)

    # -- byte streams ----------------------------------------------------------------------------
    def _streams(self) -> Iterator["Metric"]:
        from shimmy import stream_ring
        svc = self.d.streams
        lab = ["stream"]
        written = _counter("shimmy_stream_written_bytes_total", "Bytes written into the stream",
                           lab)
        read = _counter("shimmy_stream_read_bytes_total", "Bytes the reader consumed", lab)
        buffered = _gauge("shimmy_stream_buffered_bytes", "Bytes written and not yet read", lab)
        count = 0
        for rec in list(svc.streams.values()):
            try:
                q = rec.view.q
                tail, head = q[stream_ring.OFF_TAIL // 8], q[stream_ring.OFF_HEAD // 8]
            except (ValueError, IndexError):
                continue
            count += 1
            written.add_metric([rec.name], tail)
            read.add_metric([rec.name], head)
            buffered.add_metric([rec.name], tail - head)
        yield _one(_gauge("shimmy_streams", "Byte streams on this node"), count)
        yield from (written, read, buffered)
        counters = dict(svc.counters)
        yield from _totals(counters, (("streams_created", "shimmy_streams_created_total",
                                "Streams created"),
                               ("stream_ends_broken", "shimmy_stream_ends_broken_total",
                                "Stream ends whose client died (the other end sees it)"),
                               ("streams_orphaned", "shimmy_streams_orphaned_total",
                                "Finished streams freed unread after stream_orphan_timeout"),
                               ("streams_deleted", "shimmy_streams_deleted_total",
                                "Streams deleted (shimmy rm)")))

    # -- recordings (docs/recording.md) -----------------------------------------------------------
    def _recordings(self) -> Iterator["Metric"]:
        """Every recording registered with this daemon, read from its catalog (a file mapping
        of its own, opened and closed per scrape; the loop thread's rings are not touched
        beyond the published count, read as for the channel families)."""
        from shimmy.recording_registry import registered
        lab = ["channel", "track"]   # track: "0", or one per publisher of a group
        fam: dict[str, "CounterMetricFamily | GaugeMetricFamily"] = {
            "bytes": _gauge("shimmy_recording_bytes", "Bytes the recording keeps on disk", lab),
            "msgs": _gauge("shimmy_recording_messages", "Messages the recording keeps", lab),
            "oldest": _gauge("shimmy_recording_oldest_timestamp_seconds",
                             "When the oldest kept message was recorded (Unix time)", lab),
            "newest": _gauge("shimmy_recording_newest_timestamp_seconds",
                             "When the newest message was recorded (Unix time)", lab),
            "lag_msgs": _gauge("shimmy_recording_lag_messages",
                               "Messages the channel published that the recording has not yet",
                               lab),
            "lag_bytes": _gauge("shimmy_recording_lag_bytes",
                                "Ring bytes the recorder had still to read after its last write",
                                lab),
            "lost": _counter("shimmy_recording_messages_lost_total",
                             "Messages a lossy recording missed (every gap, exactly)", lab),
            "errors": _counter("shimmy_recording_write_errors_total",
                               "Writes that failed (disk full, I/O errors); each is logged by "
                               "the recorder", lab),
        }
        channels = {rec.name: rec for rec in list(self.d.registry.channels.values())}
        for r in registered(self.d.socket_path):
            name = r["channel"]
            key = [name, r["track"]]
            fam["bytes"].add_metric(key, r["bytes"])
            fam["msgs"].add_metric(key, r["messages"])
            if r["messages"]:
                fam["oldest"].add_metric(key, r["oldest_ns"] / 1e9)
                fam["newest"].add_metric(key, r["newest_ns"] / 1e9)
            rec = channels.get(name) if r["track"] == "0" else None   # groups: per publisher
            try:
                published = None if rec is None else _published(rec.view)
            except (ValueError, IndexError):
                published = None   # deleted meanwhile
            if published is not None:
                fam["lag_msgs"].add_metric(key, max(0, published - r["next_seq"]))
            fam["lag_bytes"].add_metric(key, r["lag_bytes"])
            fam["lost"].add_metric(key, r["lost"])
            fam["errors"].add_metric(key, r["errors"])
        yield from fam.values()

    # -- peering -----------------------------------------------------------------------------------
    def _peering(self) -> Iterator["Metric"]:
        p = self.d.peer
        g = _gauge("shimmy_peer_transport_info",
                   "Peer data transport setting (tcp, rdma or auto; 'none' with peering off; "
                   "each mirror's own transport is in shimmy_mirror_*) and whether an RDMA "
                   "device is usable ('unchecked' with peering off)", ["transport", "rdma"])
        if not p.enabled:
            g.add_metric(["none", "unchecked"], 1)
        else:
            g.add_metric([p.transport_kind, "unavailable" if p.rdma_reason else "available"], 1)
        yield g
        yield _by(_counter("shimmy_peer_events_total",
                           "Peering events: links accepted/dialed, reconnects, refusals, auth "
                           "failures, mirrors served/requested, replica resets, RDMA fallbacks",
                           ["event"]), sorted(dict(p.counters).items()))
        links = list(p.links.up.values())
        yield _one(_gauge("shimmy_peer_links", "Authenticated peer links up"), len(links))
        link_fams = {key: _counter(f"shimmy_peer_{key}_total", doc, ["peer"]) for key, doc in (
            ("bytes_sent", "Bytes sent to the peer node (data and control)"),
            ("bytes_received", "Bytes received from the peer node"),
            ("batches_sent", "Mirror batches sent to the peer node"),
            ("batches_received", "Mirror batches received from the peer node"))}
        for link in links:
            stats = dict(link.stats)
            for key, fam in link_fams.items():
                fam.add_metric([link.remote], stats.get(key, 0))
        yield from link_fams.values()
        yield from self._mirrors(p)

    def _mirrors(self, p) -> Iterator["Metric"]:
        lab = ["channel", "peer", "role"]
        fams = {key: _counter(f"shimmy_mirror_{key}_total", doc, lab) for key, doc in (
            ("bytes", "Ring bytes mirrored (role=source: sent to peer; replica: received)"),
            ("batches", "Mirror batches"),
            ("messages", "Messages mirrored"),
            ("gaps", "Gaps: mirrored data the source had already overwritten (lossy)"),
            ("gap_bytes", "Ring bytes skipped by gaps"))}
        reconnects = _counter("shimmy_mirror_reconnects_total",
                              "Times a replica's mirror was re-established", ["channel", "peer"])
        lag = _gauge("shimmy_mirror_lag_bytes", "Bytes the mirror is behind its source ring", lab)
        rows = [(e.name, e.node, "source", e.source) for e in list(p.sources.values())]
        for e in list(p.replicas.values()):
            rows.append((e.name, e.node, "replica", e.sink))
            reconnects.add_metric([e.name, e.node], e.reconnects)
        for name, node, role, end in rows:
            stats = end.counters()
            for key, fam in fams.items():
                fam.add_metric([name, node, role], stats.get(key, 0))
            try:
                lag.add_metric([name, node, role], end.describe()["lag_bytes"])
            except (ValueError, IndexError, KeyError):
                pass
        yield from fams.values()
        yield reconnects
        yield lag


class Exporter:
    """The HTTP endpoint serving one daemon's metrics: prometheus_client's WSGI app on a
    thread-per-connection server that survives its clients.  At most ``metrics_max_connections``
    are served at once (one more is closed at accept, counted: ``metrics_connections_refused``);
    a connection silent for ``metrics_timeout`` is closed; an ``accept()`` failing for lack of
    descriptors is counted (``metrics_accept_errors``) and accepting pauses for
    ``accept_backoff``.  Warnings are throttled like the other listeners'."""

    def __init__(self, daemon, listen: str) -> None:
        from prometheus_client.exposition import ThreadingWSGIServer, make_wsgi_app
        from prometheus_client.registry import CollectorRegistry
        s = daemon.settings
        host, port = parse_listen(listen)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(DaemonCollector(daemon))
        counters = daemon.counters
        warn = Throttle(log).warning
        slots = threading.BoundedSemaphore(s.metrics_max_connections)

        class Handler(WSGIRequestHandler):
            timeout = s.metrics_timeout   # per read and write on the connection

            def log_message(self, format, *args) -> None:
                pass   # no line per scrape

        class Server(ThreadingWSGIServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

            def get_request(self):
                try:
                    return super().get_request()
                except OSError as exc:
                    if exc.errno in RESOURCE_ERRNOS:
                        counters["metrics_accept_errors"] += 1
                        warn("accept", "metrics port: accept failed (%s); pausing accepts for "
                             "accept_backoff=%.2fs", exc, s.accept_backoff)
                        time.sleep(s.accept_backoff)
                    raise   # socketserver drops the attempt and polls again

            def verify_request(self, request, client_address) -> bool:
                if slots.acquire(blocking=False):
                    return True
                counters["metrics_connections_refused"] += 1
                warn("refuse", "metrics port: refusing a connection from %s: "
                     "metrics_max_connections=%d served at once", client_address[0],
                     s.metrics_max_connections)
                return False

            def process_request(self, request, client_address) -> None:
                try:
                    super().process_request(request, client_address)
                except BaseException:
                    slots.release()   # no thread to give it back (out of threads)
                    raise

            def handle_error(self, request, client_address) -> None:
                # A client gone silent (metrics_timeout) or reset: its connection is closed;
                # no traceback for what a client did.
                counters["metrics_connection_errors"] += 1
                warn("error", "metrics port: a connection from %s ended: %s", client_address[0],
                     sys.exc_info()[1])

            def process_request_thread(self, request, client_address) -> None:
                try:
                    super().process_request_thread(request, client_address)
                finally:
                    slots.release()

        self.server = make_server(host, port, make_wsgi_app(self.registry), Server,
                                  handler_class=Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, name="metrics",
                                       daemon=True)
        self.thread.start()
        self.address = f"{host}:{self.server.server_port}"
        log.info("metrics on http://%s/metrics", self.address)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(2.0)


def start(daemon, listen: str) -> Exporter | None:
    """Start the exporter when ``listen`` is set (the ``metrics_listen`` setting).  A port that
    cannot be bound stops the daemon with a message naming the setting, not a traceback."""
    if not listen:
        return None
    try:
        import prometheus_client  # noqa: F401
    except ImportError:
        raise SystemExit(f"shimmy daemon: metrics_listen={listen!r} needs prometheus-client, "
                         f"which is not installed: pip install 'shimmy[metrics]'") from None
    try:
        return Exporter(daemon, listen)
    except OSError as exc:
        raise SystemExit(f"shimmy daemon: cannot serve metrics on {listen} (metrics_listen): "
                         f"{exc.strerror or exc}") from None
