"""``shimmy ls``, ``shimmy stat``, ``shimmy top``, ``shimmy rm`` and ``shimmy health``: what the
daemon holds, and its upkeep.  ``shimmy.cli`` adds these commands to its group.

They ask the daemon (control requests) and print; they must never open a channel or map a ring.
"""

from __future__ import annotations

import json
import os
import sys
import time

import click

from shimmy import cli_record
from shimmy.cli_args import daemon_client, daemon_option
from shimmy.errors import DaemonUnavailable


def _print_table(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def _publisher_cell(ch: dict) -> str:
    """'yes'/'-' for an exclusive channel; 'live/max' publishers for a multi-publisher one."""
    most = ch.get("max_publishers", 1)
    if most > 1:
        return f"{sum(1 for p in ch.get('publishers', ()) if p['live'])}/{most}"
    return "yes" if ch["publisher"] is not None else "-"


@click.command(short_help="list channels and streams")
@daemon_option
@click.option("--json", "as_json", is_flag=True, help="the daemon's channel list as JSON")
def ls(daemon_path: str | None, as_json: bool) -> None:
    """Channels (mode, capacity, publisher, subscribers, lag, node, mirrors) and streams."""
    from shimmy.cli_view import human_bytes as size
    reply = daemon_client(daemon_path).request("list")
    if as_json:
        click.echo(json.dumps(reply["channels"], indent=2))
        return
    rows: list[tuple[str, ...]] = [("CHANNEL", "MODE", "CAPACITY", "PUBLISHED", "PUBLISHER",
                                    "SUBS", "MAX LAG", "NODE", "MIRRORED TO")]
    for ch in reply["channels"]:
        lag = max((s["lag_bytes"] for s in ch["subscribers"]), default=0)
        node = ch.get("node", "")
        if "replica" in ch:
            node += f" (replica, link {ch['replica']['link']})"
        published = "BROKEN" if ch.get("broken") else str(ch["published"])
        rows.append((ch["name"], ch["mode"], size(ch["capacity"]), published,
                     _publisher_cell(ch), str(len(ch["subscribers"])),
                     size(lag), node, ",".join(m["to"] for m in ch.get("mirrors", ())) or "-"))
    for ch in reply.get("remote", ()):
        rows.append((ch["name"], ch["mode"], size(ch["capacity"]), "-", "remote", "-", "-",
                     ch["node"], "-"))
    _print_table(rows)
    for ch in reply["channels"]:
        for pub in ch.get("publishers", ()):   # a multi-publisher channel: each one, and where
            state = "publishing" if pub["live"] else "left, draining"
            pid = f" pid {pub['pid']}" if pub.get("pid") else ""
            click.echo(f"{ch['name']}: publisher {pub['id']}{pid} on node "
                       f"{pub.get('node') or '?'}: {state}, {pub['published']} published")
    for ch in reply["channels"]:
        idle = ch.get("idle")
        if idle:   # no ends attached (docs/daemon.md, "Idle channels")
            unread = (f"{idle['unread_bytes']} unread bytes" if idle["unread_bytes"] else
                      "nothing unread")
            when = ("kept until deleted" if idle["reclaim_in_s"] is None else
                    f"deleted in {idle['reclaim_in_s']:.0f} s")
            click.echo(f"{ch['name']}: no ends attached for {idle['for_s']:.0f} s, {unread}: "
                       f"{when}")
    for ch in reply["channels"]:
        if ch.get("broken"):
            click.echo(f"{ch['name']}: broken: {ch['broken']} (shimmy rm {ch['name']} retires "
                       f"it)")
    streams = reply.get("streams") or []
    if streams:
        click.echo()
        from shimmy.cli_view import STREAM_COLUMNS, stream_cells
        _print_table([STREAM_COLUMNS, *(stream_cells(st) for st in streams)])
    recs = cli_record.recordings(daemon_client(daemon_path).path, reply["channels"])
    if recs:
        click.echo()
        _print_table([cli_record.RECORDING_COLUMNS, *cli_record.recording_rows(recs)])


def _stat(daemon_path: str | None) -> dict:
    reply = daemon_client(daemon_path).request("stat")
    for key in ("ok", "v", "id"):
        reply.pop(key, None)
    return reply


@click.command(short_help="daemon summary: uptime, counters, channels, peers")
@daemon_option
@click.option("--json", "as_json", is_flag=True, help="the daemon's full stat reply as JSON")
def stat(daemon_path: str | None, as_json: bool) -> None:
    """The daemon at a glance: uptime, clients, shared memory, RDMA state, counters, channels,
    streams and peers.  --json prints the daemon's own reply (spec/control.md)."""
    reply = _stat(daemon_path)
    if as_json:
        click.echo(json.dumps(reply, indent=2, default=str))
        return
    from shimmy.cli_view import console_for_stdout, stat_summary
    console_for_stdout().print(stat_summary(reply))
    recs = cli_record.recordings(daemon_client(daemon_path).path, reply["channels"])
    if recs:
        click.echo()
        _print_table([cli_record.RECORDING_COLUMNS, *cli_record.recording_rows(recs)])


@click.command(short_help="live view: channels by traffic, peers and mirrors")
@daemon_option
@click.option("--interval", type=click.FloatRange(min=0.1, max=60), default=1.0,
              show_default=True, metavar="SECONDS", help="refresh period")
@click.option("--once", is_flag=True,
              help="print one snapshot and exit (the default when stdout is not a terminal)")
@click.option("--rows", type=click.IntRange(min=1), metavar="N",
              help="show at most N channels (default: as many as fit the terminal)")
def top(daemon_path: str | None, interval: float, once: bool, rows: int | None) -> None:
    """Channels sorted by traffic with message and byte rates, ring fill, the slowest
    subscriber's lag and lapped bytes; peer links and mirrors with rates and state.  Rates
    compare two samples INTERVAL apart.  Ctrl-C (or closing the terminal) exits."""
    from shimmy.cli_top import run_top
    sys.exit(run_top(lambda: _stat(daemon_path), interval, once, rows))


@click.command(short_help="delete a channel or a stream")
@click.argument("name")
@daemon_option
@click.option("--stream", "stream", is_flag=True,
              help="delete the stream NAME even when a channel NAME exists too")
def rm(name: str, daemon_path: str | None, stream: bool) -> None:
    """Delete channel NAME (its ring is retired, holders see ChannelClosed) or, when there is
    no such channel or with --stream, stream NAME (its bytes are dropped; an end still attached
    gets StreamBroken).  Only the owner or root may delete."""
    daemon_client(daemon_path).request("delete", name=name, kind="stream" if stream else None)


@click.command(short_help="exit 0 when the daemon answers (for probes)")
@daemon_option
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=2.0,
              show_default=True, metavar="SECONDS", help="how long to wait for the reply")
def health(daemon_path: str | None, timeout: float) -> None:
    """Ping the daemon without registering as a client: exit 0 and print its pid and uptime when
    it answers, 1 when it does not (no socket file fails at once)."""
    import socket

    import msgpack

    from shimmy.protocol import PROTOCOL_VERSION, frame, read_frame, resolve_socket
    path = resolve_socket(daemon_path)
    if not os.path.exists(path):
        raise DaemonUnavailable(f"unhealthy: no socket file at {path} (is the daemon "
                                       f"running? see `shimmy daemon --socket {path}`)")
    deadline = time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(frame(msgpack.packb({"v": PROTOCOL_VERSION, "id": 1, "op": "ping"})))
            reply = msgpack.unpackb(read_frame(sock, deadline))
        except TimeoutError:
            raise DaemonUnavailable(f"unhealthy: no reply from {path} within {timeout} s") \
                from None
        except OSError as exc:
            raise DaemonUnavailable(f"unhealthy: {path}: {exc.strerror or exc}") from None
    if not isinstance(reply, dict) or not reply.get("ok"):
        raise DaemonUnavailable(f"unhealthy: {path} answered {reply!r:.200}")
    click.echo(f"ok pid={reply['pid']} uptime={reply['uptime']:.0f}s")


COMMANDS = [ls, stat, top, rm, health]
