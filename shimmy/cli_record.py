"""``shimmy record``, ``shimmy replay`` and ``shimmy export``: recorded channels on the command
line (docs/recording.md).  ``shimmy.cli`` adds these commands to its group.  They parse and
report only: recording is shimmy/recorder.py's, replay the SDK's and the recording format's."""

from __future__ import annotations

import logging
import signal
import sys
import threading

import click

from shimmy import recording
from shimmy.cli_args import Size
from shimmy.recording import RecordSettings


class _Size(Size):
    """A byte count up to terabytes (retention and segment sizes)."""

    _units = {**Size._units, "t": 1 << 40}
    _examples = "K, M, G, T: 64M, 10GiB"


def _log_to_stderr() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logger = logging.getLogger("shimmy.record")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def _register_schema(root: str, names: tuple[str, ...], spec: str) -> None:
    from shimmy.recording_export import register_schema
    kind, _, rest = spec.partition(":")
    path, _, type_name = rest.partition(":")
    if kind not in ("json", "protobuf") or not path or (kind == "protobuf") != bool(type_name):
        raise click.BadParameter(f"{spec!r}: expected json:FILE or protobuf:FILE:TYPE",
                                 param_hint="--schema")
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc.strerror}",
                                 param_hint="--schema") from None
    for name in names:
        register_schema(recording.channel_dir(root, name),
                        "jsonschema" if kind == "json" else "protobuf", type_name or name, data)


@click.command(short_help="record channels to disk (segment files + catalog)")
@click.argument("names", nargs=-1, metavar="NAME...")
@click.option("--pattern", "patterns", multiple=True, metavar="GLOB",
              help="also record every channel whose name matches (fnmatch; repeatable), as it "
                   "appears, and make recorded ones that do not exist again (daemon restart)")
@click.option("--dir", "root", required=True, type=click.Path(file_okay=False),
              help="recording directory (one sub-directory per channel)")
@click.option("--mode", type=click.Choice(sorted(recording.MODES)), default="reliable",
              show_default=True,
              help="reliable: hold the publisher back, lose nothing; lossy: never hold it back, "
                   "record every gap")
@click.option("--daemon", "daemon_path", metavar="PATH", help="daemon control socket")
@click.option("--segment-size", type=_Size(), default=RecordSettings.segment_bytes,
              show_default=True, help="a segment file is closed past this size")
@click.option("--max-bytes", type=_Size(), default=0, show_default=True,
              help="retention by size per channel (0: keep everything)")
@click.option("--max-age", type=click.FloatRange(min=0), default=0.0, show_default=True,
              metavar="SECONDS", help="retention by age (0: keep everything)")
@click.option("--fsync", type=click.Choice(recording.FSYNC_POLICIES), default="none",
              show_default=True,
              help="none: page cache only; data: fdatasync each chunk; data+metadata: fsync "
                   "each chunk, the catalog and new segments' directory entries")
@click.option("--schema", metavar="KIND:FILE[:TYPE]",
              help="register the messages' schema for export: json:FILE (a JSON Schema; "
                   "messages are JSON) or protobuf:FILE:TYPE (a FileDescriptorSet, the full "
                   "message type name)")
def record(names: tuple[str, ...], patterns: tuple[str, ...], root: str, mode: str,
           daemon_path: str | None, segment_size: int, max_bytes: int, max_age: float,
           fsync: str, schema: str | None) -> None:
    """Record the channels NAME... (and those matching --pattern) into DIR until interrupted
    (SIGINT/SIGTERM).  A recording that exists is continued; a second recorder of the same
    recording is refused."""
    from shimmy.recorder import RecorderSet
    if not names and not patterns:
        raise click.UsageError("name at least one channel, or a --pattern")
    _log_to_stderr()
    settings = RecordSettings(segment_bytes=segment_size, max_bytes=max_bytes, max_age=max_age,
                              fsync=fsync)
    recording.make_dir(root)
    if schema is not None:
        _register_schema(root, names, schema)
    recs = RecorderSet(list(names), list(patterns), root, mode, settings, daemon_path)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        recs.run(stop)
    except KeyboardInterrupt:
        pass
    finally:
        recs.close()
    failed = recs.errors()
    if failed:
        raise click.ClickException("; ".join(failed))


COMMANDS = [record]


class _Rate(click.ParamType):
    """``max`` (as fast as possible) or a positive factor of the recorded pace (1 = as
    recorded, 2 = twice as fast)."""

    name = "rate"

    def convert(self, value, param, ctx):
        if value in (None, "max") or isinstance(value, float):
            return value
        try:
            rate = float(value)
        except ValueError:
            rate = 0.0
        if not rate > 0:
            self.fail(f"{value!r} is not a rate: 'max' or a factor > 0 (1 keeps the recorded "
                      f"spacing)", param, ctx)
        return rate


def _track_of(root: str, name: str) -> str:
    import os
    track = os.path.join(recording.channel_dir(root, name), recording.MAIN_TRACK)
    if not os.path.isfile(os.path.join(track, "catalog")):
        group = sorted(t for n, t in recording.tracks(root) if n == name)
        if group:
            raise click.UsageError(
                f"{root} holds channel {name!r} as a publisher group ({len(group)} publishers' "
                f"tracks); replaying a group is not supported (export it: shimmy export)")
        have = sorted({n for n, _ in recording.tracks(root)})
        raise click.UsageError(f"{root} holds no recording of channel {name!r} (it has: "
                               f"{', '.join(map(repr, have)) or 'none'})")
    return track


@click.command(short_help="publish a recording again, into another channel")
@click.argument("root", metavar="DIR", type=click.Path(exists=True, file_okay=False))
@click.argument("name")
@click.option("--to", "to", required=True, metavar="NEWNAME", help="channel to publish into")
@click.option("--rate", type=_Rate(), default="1", show_default=True,
              help="'max': as fast as possible; a factor of the recorded pace (1: the recorded "
                   "spacing, 2: twice as fast)")
@click.option("--daemon", "daemon_path", metavar="PATH", help="daemon control socket")
def replay(root: str, name: str, to: str, rate, daemon_path: str | None) -> None:
    """Publish every message of channel NAME's recording in DIR into NEWNAME, in order, keeping
    the recorded spacing (the times at which the recorder read them) or as fast as possible."""
    import time

    import shimmy
    track = _track_of(root, name)
    with shimmy.Channel(to, daemon=daemon_path) as ch:
        publish = ch.publish
        start_wall = start_rec = None
        n = 0
        for _, t, data in recording.frames_with_time(track):
            if rate != "max":
                if start_rec is None:
                    start_wall, start_rec = time.monotonic(), t
                else:
                    due = start_wall + (t - start_rec) / 1e9 / rate
                    delay = due - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
            publish(data)
            n += 1
    click.echo(f"replayed {n} messages of {name!r} into {to!r}", err=True)


COMMANDS.append(replay)


@click.command(short_help="write recordings to an MCAP file (Foxglove, mcap CLI)")
@click.argument("root", metavar="DIR", type=click.Path(exists=True, file_okay=False))
@click.option("--mcap", "out", required=True, type=click.Path(dir_okay=False), metavar="FILE",
              help="MCAP file to write")
@click.option("--channel", "channels", multiple=True, metavar="NAME",
              help="export only this channel (repeatable; default: every recording in DIR)")
def export(root: str, out: str, channels: tuple[str, ...]) -> None:
    """Write the recordings in DIR to an MCAP file: one MCAP channel per recorded channel, log
    time = when the recorder read the message, raw bytes unless a schema was registered
    (``shimmy record --schema``, docs/recording.md)."""
    from shimmy.recording_export import export_mcap
    counts = export_mcap(root, out, list(channels) or None)
    for topic, n in counts.items():
        click.echo(f"{topic}: {n} messages", err=True)


COMMANDS.append(export)


# -- ls / stat: the recordings registered with the daemon --------------------------------------
RECORDING_COLUMNS = ("RECORDING", "MODE", "BYTES", "MESSAGES", "OLDEST", "NEWEST",
                     "RECORDER LAG", "LOST", "ERRORS", "DIR")


def recordings(socket_path: str, channels: list[dict]) -> list[dict]:
    """Each registered recording's summary, with ``lag_messages``: messages the channel has
    published that the recording has not (None where the channel is not open here)."""
    from shimmy.recording_registry import registered
    published = {c["name"]: c.get("published") for c in channels}
    out = []
    for r in registered(socket_path):
        # A group's per-publisher numbering has no channel-wide count to compare with.
        pub = published.get(r["channel"]) if r["track"] == recording.MAIN_TRACK else None
        out.append({**r, "lag_messages": None if pub is None else max(0, pub - r["next_seq"])})
    return out


def _when(ns: int) -> str:
    import time
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9)) if ns else "-"


def recording_rows(recs: list[dict]) -> list[tuple[str, ...]]:
    from shimmy.cli_view import human_bytes as size
    rows: list[tuple[str, ...]] = []
    for r in recs:
        empty = r["messages"] == 0
        lag = "-" if r["lag_messages"] is None else f"{r['lag_messages']} msgs"
        name = r["channel"] if r["track"] == recording.MAIN_TRACK else \
            f"{r['channel']} [{recording.channel_name(r['track'])}]"
        rows.append((name, r["mode"], size(r["bytes"]), str(r["messages"]),
                     "-" if empty else f"{r['first_seq']} @ {_when(r['oldest_ns'])}",
                     "-" if empty else f"{r['next_seq'] - 1} @ {_when(r['newest_ns'])}",
                     f"{lag}, {size(r['lag_bytes'])}", str(r["lost"]), str(r["errors"]),
                     r["dir"]))
    return rows
