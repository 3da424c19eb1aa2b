"""``shimmy pub``, ``shimmy sub`` and ``shimmy cat``: messages and bytes between the command line
and channels or streams.  ``shimmy.cli`` adds these commands to its group.

They parse, refuse early what would create a channel or stream in vain, and move bytes through
the SDK; they must never touch a ring's words themselves.
"""

from __future__ import annotations

import os
import stat as stat_mod
import sys
import time
from collections.abc import Iterable
from typing import Any

import click

import shimmy
from shimmy import cli_io, ring, stream_ring
from shimmy.cli_args import MiB, RingCapacity, daemon_client, daemon_option, parse_delimiter
from shimmy.errors import ChannelConflict, ChannelNotFound, MessageTooLarge, ReceiveTimeout
from shimmy.names import validate_name


# -- pub / sub -------------------------------------------------------------------------------------
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


@click.command(short_help="publish messages (arguments, or stdin)")
@click.argument("channel")
@click.argument("message", nargs=-1)
@daemon_option
@click.option("--mode", type=click.Choice(sorted(ring.MODES)),
              help="reliable (wait for slow subscribers) or lossy (never wait), when the channel "
                   "is created (default reliable)")
@click.option("--capacity", type=RingCapacity(ring.check_capacity), metavar="SIZE",
              help="ring size when the channel is created: a power of two, 4K..1G (largest "
                   "message = capacity/2 - 16); default: the daemon's default_capacity (4 MiB)")
@click.option("--delimiter", default="\\n", show_default=True, metavar="BYTES",
              callback=parse_delimiter,
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
    client = daemon_client(daemon_path)
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


@click.command(short_help="print messages as they arrive")
@click.argument("channel")
@daemon_option
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
              callback=parse_delimiter, help="written after each message (text, hex, raw)")
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


@click.command(short_help="copy stdin into a byte stream (--write), or a stream to stdout")
@click.argument("stream")
@daemon_option
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
    _check_stream_name(daemon_client(daemon_path), stream, write, wait)
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


COMMANDS = [pub, sub, cat]
