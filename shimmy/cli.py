"""The ``shimmy`` command: daemon | pub | sub | cat | ls | stat | top | rm | health | bench | demo
| record | replay | export.

Exit codes: 0 success, 1 a runtime failure (daemon unreachable, refused operation, timeout),
2 a usage error (bad option, bad value, bad name), 130 interrupted.  Errors are one line on
stderr naming what was wrong; no traceback reaches the user.  A closed stdout (``shimmy ls |
head -1``) ends the command quietly.  The commands parse, call the SDK or the daemon's control
requests, and print: they must never touch a ring's words themselves.
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat as stat_mod
import sys
import time
from collections.abc import Iterable
from typing import Any

import click

import shimmy
from shimmy import cli_io, cli_record, ring, stream_ring
from shimmy.errors import (
    ChannelConflict,
    ChannelNotFound,
    DaemonUnavailable,
    InvalidArgument,
    InvalidName,
    MessageTooLarge,
    ReceiveTimeout,
    ShimmyError,
)
from shimmy.bench.runner import bench
from shimmy.names import validate_name

MiB = 1 << 20
# Argument errors found by the SDK or the daemon count as usage errors (exit 2).
USAGE_ERRORS = (InvalidName, InvalidArgument)


class Size(click.ParamType):
    """A byte count: ``65536``, ``64K``/``64KiB``, ``4M``/``4MiB``, ``1G``/``1GiB``."""

    name = "size"
    _units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        text = str(value).strip().lower().removesuffix("b").removesuffix("i")
        unit = text[-1:] if text[-1:] in ("k", "m", "g") else ""
        number = text[:len(text) - len(unit)]
        if not number.isdigit():
            self.fail(f"{value!r} is not a size (bytes, or with K, M, G: 64K, 4MiB)", param, ctx)
        return int(number) * self._units[unit]


class RingCapacity(Size):
    """A ring capacity: a power of two within the ring's limits."""

    def __init__(self, check):
        self.check = check

    def convert(self, value, param, ctx):
        n = super().convert(value, param, ctx)
        try:
            self.check(n)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return n


def _daemon_option(f):
    return click.option("--daemon", "daemon_path", metavar="PATH",
                        help="daemon control socket (default: $SHIMMY_DAEMON, else "
                             "/run/shimmy/shimmyd.sock)")(f)


def _client(daemon_path: str | None):
    from shimmy.sdk.client import get_client
    return get_client(daemon_path)


class _PipeClosed(Exception):
    """Whoever read our stdout stopped reading (``| head``): the command ends quietly."""


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except BrokenPipeError as exc:
            if isinstance(exc, ShimmyError):  # StreamBroken: a stream's writer died
                raise
            raise _PipeClosed() from None


# Which per-message ring paths this install runs (shimmy/_ringcore.c or the Python versions).
_RING_PATHS = ("C" if ring.ACCELERATED else
               "Python: set by SHIMMY_PURE_PYTHON" if os.environ.get("SHIMMY_PURE_PYTHON") else
               "Python: the C extension was not built, see the README")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"],
                                           "max_content_width": 100})
@click.version_option(shimmy.__version__, "-V", "--version", prog_name="shimmy",
                      message="%(prog)s %(version)s (ring paths: " + _RING_PATHS + ")")
def cli() -> None:
    """Shared-memory channels and streams on one node, mirrored across nodes."""


# -- daemon: one flag per Settings field (daemon/config.py is the single source) -------------------
_FLAG_ALIASES = {"peers": ["--peer"]}   # the singular spelling the docs use


def _settings_params() -> list[click.Parameter]:
    from shimmy.daemon.config import Settings
    params: list[click.Parameter] = [
        click.Option(["config", "--config"], metavar="FILE", type=click.Path(dir_okay=False),
                     help="TOML settings file (docs/daemon.md); flags override it")]
    for f in dataclasses.fields(Settings):
        default = (f.default_factory() if f.default_factory is not dataclasses.MISSING
                   else f.default)
        help_text = f.metadata.get("help", "")
        flag = "--" + f.name.replace("_", "-")
        decls = [f.name, flag, *_FLAG_ALIASES.get(f.name, [])]
        if isinstance(default, bool):
            params.append(click.Option([f.name, f"{flag}/--no-{flag[2:]}"], default=None,
                                       help=f"{help_text} (default: {default})"))
        elif isinstance(default, list):
            params.append(click.Option(decls, multiple=True, metavar="VALUE",
                                       help=f"{help_text}"))
        else:
            choices = f.metadata.get("choices")
            kind = (click.Choice(choices) if choices
                    else {int: int, float: float}.get(type(default), str))
            shown = default if default != "" else "none"
            params.append(click.Option(decls, type=kind, default=None,
                                       help=f"{help_text} (default: {shown})"))
    return params


def _run_daemon(config: str | None, **overrides) -> int:
    from shimmy.daemon import config as config_mod
    from shimmy.daemon import server
    overrides = {k: (list(v) if v else None) if isinstance(v, tuple) else v
                 for k, v in overrides.items()}
    try:
        settings = config_mod.load(config, **overrides)
    except (OSError, ValueError, TypeError) as exc:
        click.echo(f"shimmy daemon: bad settings: {exc}", err=True)
        return 2
    server.run(settings)
    return 0


cli.add_command(click.Command(
    "daemon", callback=_run_daemon, params=_settings_params(),
    help="Run the node daemon.  Every setting of docs/daemon.md is a flag here; flags override "
         "--config.", short_help="run the node daemon"))


# -- pub / sub -------------------------------------------------------------------------------------
def _parse_delimiter(ctx: click.Context, param: click.Parameter, value: str) -> bytes:
    try:
        return cli_io.parse_delimiter(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _planned_max_message(client, name: str, capacity: int | None) -> int:
    """The largest message the channel will take, known before opening it (so a refused message
    creates nothing): the existing channel's, else that of the capacity it would be created with."""
    listing = client.request("list")
    for ch in listing.get("channels", ()):
        if ch["name"] == name:
            return ring.max_message_size(ch["capacity"])
    if capacity is None:
        settings = client.request("stat").get("settings", {})
        capacity = settings.get("default_capacity", ring.DEFAULT_CAPACITY)
    return ring.max_message_size(capacity)


@cli.command(short_help="publish messages (arguments, or stdin)")
@click.argument("channel")
@click.argument("message", nargs=-1)
@_daemon_option
@click.option("--mode", type=click.Choice(sorted(ring.MODES)),
              help="reliable (wait for slow subscribers) or lossy (never wait), when the channel "
                   "is created (default reliable)")
@click.option("--capacity", type=RingCapacity(ring.check_capacity), metavar="SIZE",
              help="ring size when the channel is created: a power of two, 4K..1G (largest "
                   "message = capacity/2 - 16); default: the daemon's default_capacity (4 MiB)")
@click.option("--delimiter", default="\\n", show_default=True, metavar="BYTES",
              callback=_parse_delimiter,
              help="what separates messages on stdin (escapes like \\n, \\0, \\x1e work)")
@click.option("-0", "--null", is_flag=True, help="messages on stdin end with a NUL byte")
@click.option("--whole", is_flag=True, help="all of stdin is one message")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=10.0,
              show_default=True, help="reliable mode: seconds to wait for room in a full ring")
@click.option("-v", "--verbose", is_flag=True, help="print each message's sequence number")
def pub(channel: str, message: tuple[str, ...], daemon_path: str | None, mode: str | None,
        capacity: int | None, delimiter: bytes, null: bool, whole: bool, timeout: float,
        verbose: bool) -> None:
    """Publish each MESSAGE argument, or else stdin: one message per line (see --delimiter,
    --null, --whole).  Bytes are published as they are, never decoded.  Input is read as it
    arrives, so `tail -f log | shimmy pub logs` works."""
    validate_name(channel)
    client = _client(daemon_path)
    limit = _planned_max_message(client, channel, capacity)
    if message:
        payloads = [os.fsencode(m) for m in message]
        for i, data in enumerate(payloads, 1):
            if len(data) > limit:
                raise MessageTooLarge(
                    f"message {i} is {len(data)} bytes; channel {channel!r} takes at most "
                    f"{limit} bytes (largest message = capacity/2 - 16; see --capacity)")
        source: Iterable[bytes] = payloads
    else:
        source = cli_io.MessageReader(sys.stdin.buffer,
                                      None if whole else b"\0" if null else delimiter, limit)
    ch = None
    try:
        for data in source:
            if ch is None:  # opened (and perhaps created) only once a message is acceptable
                ch = shimmy.Channel(channel, daemon=daemon_path, mode=mode, capacity=capacity,
                                    publish_timeout=timeout)
                if isinstance(source, cli_io.MessageReader):
                    source.limit = ch.max_message
            seq = ch.publish(data)
            if verbose:
                click.echo(seq)
    finally:
        if ch is not None:
            ch.close()


@cli.command(short_help="print messages as they arrive")
@click.argument("channel")
@_daemon_option
@click.option("--count", type=click.IntRange(min=1), metavar="N", help="stop after N messages")
@click.option("--start", type=click.Choice(["next", "oldest"]), default="next", show_default=True,
              help="next: only messages published from now on; oldest: also those still held")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="fail (exit 1) when no message arrives for this long (default: wait forever)")
@click.option("--format", "fmt", type=click.Choice(cli_io.FORMATS), default="text",
              show_default=True,
              help="text: UTF-8, other bytes as \\xNN escapes; hex; raw: the bytes themselves; "
                   "json: one object per line (text or base64)")
@click.option("--delimiter", default="\\n", show_default=True, metavar="BYTES",
              callback=_parse_delimiter, help="written after each message (text, hex, raw)")
@click.option("-0", "--null", is_flag=True, help="end each message with a NUL byte (for raw)")
@click.option("--seq", is_flag=True, help="prefix each message with its sequence number and a tab")
def sub(channel: str, daemon_path: str | None, count: int | None, start: str,
        timeout: float | None, fmt: str, delimiter: bytes, null: bool, seq: bool) -> None:
    """Print the messages of CHANNEL as they arrive.  Lost messages (lossy channels) are
    reported on stderr as `# lost N messages`."""
    delim = b"\0" if null else delimiter
    out = sys.stdout.buffer
    with shimmy.Channel(channel, daemon=daemon_path) as ch, ch.subscribe(start=start) as s:
        n = 0
        while count is None or n < count:
            try:
                msg = s.receive(timeout=timeout)
            except ReceiveTimeout:
                raise ReceiveTimeout(f"no message on {channel!r} within {timeout} s "
                                     f"(--timeout)") from None
            if msg.lost:
                click.echo(f"# lost {msg.lost} messages", err=True)
            out.write(cli_io.render_message(bytes(msg), fmt, seq=msg.seq, lost=msg.lost,
                                            with_seq=seq, delimiter=delim))
            out.flush()
            n += 1


# -- streams ---------------------------------------------------------------------------------------
def _check_stream_name(client, name: str, write: bool, wait: bool) -> None:
    """Refuse, before creating anything, what would otherwise wait forever: a pub/sub channel's
    name, or reading again a stream whose reader already finished it."""
    listing = client.request("list")
    if any(s["name"] == name for s in listing.get("streams", ())):
        return
    if any(c["name"] == name for c in listing.get("channels", ())):
        raise ChannelConflict(
            f"{name!r} is a pub/sub channel, not a stream: read it with `shimmy sub {name}`, "
            f"publish with `shimmy pub {name}`")
    if not write and not wait:
        done = next((s for s in listing.get("finished_streams", ()) if s["name"] == name), None)
        if done is not None:
            how = done.get("how", "read")
            if how == "orphaned":
                what = (f"was freed unread: its writer finished and no reader came within the "
                        f"daemon's stream_orphan_timeout ({done['dropped']} bytes dropped)")
            elif how == "deleted":
                what = f"was deleted (shimmy rm; {done['dropped']} bytes dropped)"
            else:
                what = (f"already ended: its reader read all {done['written']} bytes and the "
                        f"stream was freed")
            raise ChannelNotFound(
                f"stream {name!r} {what}; start a writer again (`shimmy cat --write {name}`), or "
                f"pass --wait to wait for one")


@cli.command(short_help="copy stdin into a byte stream (--write), or a stream to stdout")
@click.argument("stream")
@_daemon_option
@click.option("--write", is_flag=True, help="write stdin into the stream (default: read it)")
@click.option("--capacity", type=RingCapacity(stream_ring.check_capacity), metavar="SIZE",
              help="ring size when the stream is created: a power of two, 4K..1G (default 2 MiB)")
@click.option("--chunk", type=click.IntRange(min=1, max=64 * MiB), default=1 << 16,
              show_default=True, metavar="BYTES", help="bytes per copy, 1..64 MiB")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="fail (exit 1) after this long blocked (default: wait forever)")
@click.option("--wait", is_flag=True,
              help="reading: wait for a new writer even when the stream already ended")
@click.option("--progress/--no-progress", default=None,
              help="progress on stderr (default: when stderr is a terminal)")
def cat(stream: str, daemon_path: str | None, write: bool, capacity: int | None, chunk: int,
        timeout: float | None, wait: bool, progress: bool | None) -> None:
    """`shimmy cat --write NAME < file` copies stdin into stream NAME; `shimmy cat NAME > file`
    copies the stream to stdout until its writer closes it."""
    validate_name(stream)
    _check_stream_name(_client(daemon_path), stream, write, wait)
    handle = shimmy.Stream(stream, daemon=daemon_path, capacity=capacity)
    show = sys.stderr.isatty() if progress is None else progress
    total = None
    src: Any = sys.stdin.buffer
    end: shimmy.StreamWriter | shimmy.StreamReader
    if write:
        end = handle.writer(timeout=timeout)
        try:
            st = os.fstat(src.fileno())
            total = st.st_size if st.st_size and stat_mod.S_ISREG(st.st_mode) else None
        except (OSError, ValueError):
            pass
    else:
        end = handle.reader(timeout=timeout)
    out = sys.stdout.buffer
    buf = bytearray(chunk)
    view = memoryview(buf)
    done, started, shown = 0, time.monotonic(), 0.0

    def report(final: bool = False) -> None:
        from shimmy.cli_view import human_bytes
        elapsed = max(time.monotonic() - started, 1e-9)
        rate = done / elapsed
        line = f"\r{human_bytes(done)}  {human_bytes(rate)}/s"
        if total:
            eta = (total - done) / rate if rate else 0
            line += f"  {100 * done / total:5.1f}%  ETA {eta:4.0f}s"
        sys.stderr.write(line + ("\n" if final else ""))
        sys.stderr.flush()

    with end:
        while True:
            if write:
                n = src.readinto(buf)
                if not n:
                    break
                end.write(view[:n])
            else:
                n = end.readinto(buf)
                if not n:
                    break
                out.write(view[:n])
            done += n
            if show and time.monotonic() - shown > 0.2:
                shown = time.monotonic()
                report()
    if not write:
        out.flush()
    if show:
        report(final=True)


# -- inspection ------------------------------------------------------------------------------------
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


@cli.command(short_help="list channels and streams")
@_daemon_option
@click.option("--json", "as_json", is_flag=True, help="the daemon's channel list as JSON")
def ls(daemon_path: str | None, as_json: bool) -> None:
    """Channels (mode, capacity, publisher, subscribers, lag, node, mirrors) and streams."""
    from shimmy.cli_view import human_bytes as size
    reply = _client(daemon_path).request("list")
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
    recs = cli_record.recordings(_client(daemon_path).path, reply["channels"])
    if recs:
        click.echo()
        _print_table([cli_record.RECORDING_COLUMNS, *cli_record.recording_rows(recs)])


def _stat(daemon_path: str | None) -> dict:
    reply = _client(daemon_path).request("stat")
    for key in ("ok", "v", "id"):
        reply.pop(key, None)
    return reply


@cli.command(short_help="daemon summary: uptime, counters, channels, peers")
@_daemon_option
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
    recs = cli_record.recordings(_client(daemon_path).path, reply["channels"])
    if recs:
        click.echo()
        _print_table([cli_record.RECORDING_COLUMNS, *cli_record.recording_rows(recs)])


@cli.command(short_help="live view: channels by traffic, peers and mirrors")
@_daemon_option
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


@cli.command(short_help="delete a channel or a stream")
@click.argument("name")
@_daemon_option
@click.option("--stream", "stream", is_flag=True,
              help="delete the stream NAME even when a channel NAME exists too")
def rm(name: str, daemon_path: str | None, stream: bool) -> None:
    """Delete channel NAME (its ring is retired, holders see ChannelClosed) or, when there is
    no such channel or with --stream, stream NAME (its bytes are dropped; an end still attached
    gets StreamBroken).  Only the owner or root may delete."""
    _client(daemon_path).request("delete", name=name, kind="stream" if stream else None)


@cli.command(short_help="exit 0 when the daemon answers (for probes)")
@_daemon_option
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


cli.add_command(bench)   # shimmy/bench/runner.py


@cli.command(short_help="embedded daemon + publisher + 2 subscribers, vs ZeroMQ")
@click.option("--seconds", type=click.FloatRange(min=0.1, max=3600), default=3.0,
              show_default=True, help="how long each workload runs")
@click.option("--size", type=click.IntRange(min=1, max=ring.max_message_size(ring.DEFAULT_CAPACITY)
                                            ),
              default=256, show_default=True, metavar="BYTES", help="message size")
def demo(seconds: float, size: int) -> None:
    """Start a private daemon, run one publisher and two subscriber processes with live
    progress, then the same workload over ZeroMQ ipc; everything is removed at the end."""
    from shimmy.demo import run_demo
    sys.exit(run_demo(seconds=seconds, size=size))


# -- recordings: record, replay, export (shimmy/cli_record.py) -------------------------------------
for _command in cli_record.COMMANDS:
    cli.add_command(_command)


# -- entry point -----------------------------------------------------------------------------------
def _quiet_stdout() -> None:
    """stdout's reader went away: point stdout at /dev/null so the final flush is silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _fail(message: str) -> None:
    try:
        click.echo(message, err=True)
    except OSError:
        pass  # stderr is gone too


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    code = 0
    stdout = sys.stdout
    try:
        result = cli.main(args=argv, prog_name="shimmy", standalone_mode=False)
        code = result if isinstance(result, int) else 0
    except click.exceptions.Exit as exc:
        code = exc.exit_code
    except click.ClickException as exc:
        exc.show()
        code = exc.exit_code
    except (click.Abort, KeyboardInterrupt):
        code = 130
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            _fail(exc.code)
        if sys.stdout is not stdout:
            code = 0  # click met a closed stdout (printing help) and wrapped it: not an error
    except USAGE_ERRORS as exc:
        _fail(f"shimmy: {type(exc).__name__}: {exc}")
        code = 2
    except ShimmyError as exc:
        _fail(f"shimmy: {type(exc).__name__}: {exc}")
        code = 1
    except _PipeClosed:
        _quiet_stdout()
        code = 0
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        _fail(f"shimmy: {exc.strerror or exc}{where}")
        code = 1
    except Exception as exc:  # a bug: one line for the user, the traceback on request
        if os.environ.get("SHIMMY_DEBUG"):
            raise
        _fail(f"shimmy: internal error: {type(exc).__name__}: {exc} (SHIMMY_DEBUG=1 shows the "
              f"traceback)")
        code = 1
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        _quiet_stdout()
    except OSError:
        pass
    return code


if __name__ == "__main__":
    sys.exit(main())
