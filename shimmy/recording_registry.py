"""The registry of a daemon's recordings: channel name -> recording directory, a directory of
symlinks next to the daemon's socket.  The recorder registers what it records; ``Channel.subscribe``
(a join from a recording), the daemon's ``/metrics`` and ``shimmy record ls`` look it up.

It only names directories: it must never open a recording for writing (the recorder holding a
track's ``flock`` is its one writer, docs/recording.md).
"""

from __future__ import annotations

import os

from shimmy import recording
from shimmy.protocol import resolve_socket


def registry_dir(socket_path: str | None) -> str:
    """Where a daemon's recordings are registered: channel name -> recording directory, so
    ``Channel.subscribe(start=<seq>|<datetime>|"recorded")`` finds them."""
    return resolve_socket(socket_path) + ".recordings"


def register(socket_path: str, name: str, channel_dir: str) -> None:
    reg = registry_dir(socket_path)
    recording.make_dir(reg)
    link = recording.channel_dir(reg, name)
    tmp = f"{link}.{os.getpid()}.tmp"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    os.symlink(os.path.abspath(channel_dir), tmp)
    os.replace(tmp, link)   # atomic: a reader sees the old link or the new one


def lookup(socket_path: str | None, name: str) -> str | None:
    """The recording directory registered for channel ``name``, or None."""
    link = recording.channel_dir(registry_dir(socket_path), name)
    return os.path.realpath(link) if os.path.isdir(link) else None


def registered(socket_path: str | None) -> list[dict]:
    """The catalog summary (``recording.Catalog.summary``, plus ``dir``) of every track of every
    recording registered with the daemon at ``socket_path`` (one per channel; a publisher
    group's has one per publisher): what ``ls``, ``stat`` and ``/metrics`` show.  A
    registration whose recording is gone or unreadable is left out."""
    reg = registry_dir(socket_path)
    try:
        entries = sorted(os.listdir(reg))
    except OSError:
        return []
    out = []
    for entry in entries:
        cdir = os.path.realpath(os.path.join(reg, entry))
        try:
            names = sorted(os.listdir(cdir))
        except OSError:
            continue
        for t in names:
            try:
                cat = recording.Catalog(os.path.join(cdir, t))
            except (OSError, recording.RecordingError):
                continue   # not a track (schema.json), or gone
            try:
                out.append({**cat.summary(), "dir": cdir})
            finally:
                cat.close()
    return out
