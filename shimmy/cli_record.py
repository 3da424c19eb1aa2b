"""``shimmy record``, ``shimmy replay`` and ``shimmy export``: recorded channels on the command
line (docs/recording.md).  ``shimmy.cli`` adds these commands to its group."""

from __future__ import annotations

import logging
import signal
import sys
import threading

import click

from shimmy import recording
from shimmy.recording import RecordSettings


class _Size(click.ParamType):
    name = "size"
    _units = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        text = str(value).strip().lower().removesuffix("b").removesuffix("i")
        unit = text[-1:] if text[-1:] in self._units else ""
        number = text[:len(text) - len(unit)]
        if not number.isdigit():
            self.fail(f"{value!r} is not a size (bytes, or with K, M, G, T: 64M, 10GiB)", param,
                      ctx)
        return int(number) * self._units[unit]


def _log_to_stderr() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    logger = logging.getLogger("shimmy.record")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


@click.command(short_help="record channels to disk (segment files + catalog)")
@click.argument("names", nargs=-1, required=True, metavar="NAME...")
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
def record(names: tuple[str, ...], root: str, mode: str, daemon_path: str | None,
           segment_size: int, max_bytes: int, max_age: float, fsync: str) -> None:
    """Record the channels NAME... into DIR until interrupted (SIGINT/SIGTERM).  A recording
    that exists is continued; a second recorder of the same recording is refused."""
    from shimmy.recorder import open_recorders
    _log_to_stderr()
    settings = RecordSettings(segment_bytes=segment_size, max_bytes=max_bytes, max_age=max_age,
                              fsync=fsync)
    recording.make_dir(root)
    recs = open_recorders(list(names), root, mode, settings, daemon_path)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    for rec in recs:
        click.echo(f"recording {rec.name!r} ({mode}) into {rec.cdir}", err=True)
    threads = [threading.Thread(target=rec.run, name=f"record {rec.name}", daemon=True)
               for rec in recs]
    for t in threads:
        t.start()
    try:
        while not stop.wait(0.2):
            if not any(t.is_alive() for t in threads):
                break
    except KeyboardInterrupt:
        pass
    for rec in recs:
        rec.stopped = True
    for t in threads:
        t.join(2.0)
    for rec in recs:
        rec.close()
    failed = [rec for rec in recs if rec.error is not None]
    if failed:
        raise click.ClickException("; ".join(f"recording {r.name!r} stopped: {r.error}"
                                             for r in failed))


COMMANDS = [record]
