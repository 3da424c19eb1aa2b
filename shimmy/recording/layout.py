"""A channel's recording on disk: segment files of ring frames, a chunk index, a catalog.

The format and its crash argument are in docs/recording.md; the words are named here once.

    DIR/<quoted channel name>/<track>/catalog        4 KiB, mapped: the u64 words W_* below
    DIR/<quoted channel name>/<track>/<offset>.seg   frames exactly as the ring holds them
    DIR/<quoted channel name>/<track>/<offset>.idx   one ENTRY per chunk written to that segment

A track is one publisher's stream of frames (a channel's ring, or one member ring of a
publisher group); ``<offset>`` is the byte offset, in the track's endless stream of frames, at
which the segment starts (20 digits, so names sort in order).  One process writes a track: the
recorder holding the catalog's ``flock``.  Readers never write.

This module is the format alone (names, paths, the catalog's words and its read-only view, the
frame check) and the settings; it must never write a track (that is ``writer``) nor follow one
(``reader``).
"""

from __future__ import annotations

import dataclasses
import mmap
import os
import struct
import urllib.parse
from collections.abc import Iterator

from shimmy.errors import InvalidArgument, ShimmyError
from shimmy.ring import HEADER

CATALOG_SIZE = 4096
MAGIC = 0x44434552594D4853   # b"SHMYRECD" read as a little-endian u64
VERSION = 1
DIR_MODE = 0o750             # set explicitly (never by umask): owner writes, group reads
FILE_MODE = 0o640

# Catalog words (u64; one writer, the recorder; stored in the order docs/recording.md gives).
W_MAGIC = 0
W_VERSION = 1
W_MODE = 2             # 0 reliable, 1 lossy: the recorder's mode
W_COMMITTED = 3        # COMMIT WORD: end of the last complete frame readers may read
W_FIRST_OFFSET = 4     # start of the oldest segment kept (retention moves it)
W_FIRST_SEQ = 5        # seq of the oldest message kept
W_NEXT_SEQ = 6         # seq of the last recorded message + 1 (0: none yet)
W_FIRST_TIME = 7       # ns since the epoch: when the oldest kept chunk was read
W_LAST_TIME = 8        # ... the newest
W_MESSAGES = 9         # messages recorded, ever
W_LOST = 10            # messages the recorder missed (lossy), ever: the seq gaps in the track
W_LAG = 11             # bytes of the ring the recorder had yet to read after its last chunk
W_CREATED = 12
W_DROPPED = 13         # messages deleted by retention, ever
W_ERRORS = 14          # writes that failed (disk full...): each is logged by the recorder
W_START_SEQ = 15       # seq the recording expected first (messages before it are lost)
W_RING_MODE = 16       # the channel's mode + 1 (0: not known yet) ...
W_CAPACITY = 17        # ... and ring capacity, so a restarted daemon's channel is made alike
OFF_NAME = 256         # u32 length + UTF-8 channel name

ENTRY = struct.Struct("<QQQQ")   # stream offset of a chunk, its first seq, time ns, messages before
SEG_SUFFIX = ".seg"
IDX_SUFFIX = ".idx"
MAX_FRAME = 1 << 30              # the largest ring message is capacity/2 - 16 <= 512 MiB
FSYNC_POLICIES = ("none", "data", "data+metadata")
MODES = {"reliable": 0, "lossy": 1}
MODE_NAMES = {v: k for k, v in MODES.items()}
MAIN_TRACK = "0"                 # a single-publisher channel's only track


class RecordingError(ShimmyError, OSError):
    """A recording cannot be written or read (busy, damaged, disk full, missing)."""

    code = "recording"


@dataclasses.dataclass(frozen=True)
class RecordSettings:
    """How a recording is kept (docs/recording.md, "Settings")."""

    segment_bytes: int = 64 << 20   # a segment is closed past this size (at a chunk boundary)
    max_bytes: int = 0              # retention by size (0: unbounded)
    max_age: float = 0.0            # retention by age in seconds (0: unbounded)
    fsync: str = "none"             # none | data | data+metadata

    def __post_init__(self) -> None:
        if self.fsync not in FSYNC_POLICIES:
            raise InvalidArgument(f"record fsync policy must be one of {FSYNC_POLICIES}, got "
                                  f"{self.fsync!r}")
        if self.segment_bytes < 1 << 16:
            raise InvalidArgument(f"record segment size must be at least 64 KiB, got "
                                  f"{self.segment_bytes}")
        if self.max_bytes < 0 or self.max_age < 0:
            raise InvalidArgument("record retention limits must be >= 0 (0 = unbounded)")


def quote(name: str) -> str:
    """A name as one path component: ``/`` and ``.`` escaped (never ``..``, never a path)."""
    return urllib.parse.quote(name, safe="").replace(".", "%2E")


def channel_dir(root: str, name: str) -> str:
    """The directory of channel ``name``'s recording under ``root``."""
    return os.path.join(root, quote(name))


def channel_name(entry: str) -> str:
    return urllib.parse.unquote(entry)


def make_dir(path: str) -> None:
    os.makedirs(path, exist_ok=True)
    os.chmod(path, DIR_MODE)


def segments(track: str) -> list[int]:
    """Start offsets of the track's segments, oldest first."""
    try:
        names = os.listdir(track)
    except FileNotFoundError:
        return []
    return sorted(int(n[:-4]) for n in names if n.endswith(SEG_SUFFIX) and n[:-4].isdigit())


def seg_path(track: str, start: int, suffix: str = SEG_SUFFIX) -> str:
    return os.path.join(track, f"{start:020d}{suffix}")


def read_entries(track: str, start: int) -> list[tuple[int, int, int, int]]:
    """The index entries of segment ``start`` (only whole entries; an absent index is empty)."""
    try:
        with open(seg_path(track, start, IDX_SUFFIX), "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        return []
    n = len(raw) // ENTRY.size
    return [ENTRY.unpack_from(raw, i * ENTRY.size) for i in range(n)]


def open_catalog(track: str, write: bool) -> tuple[int, mmap.mmap, memoryview]:
    path = os.path.join(track, "catalog")
    fd = os.open(path, os.O_RDWR if write else os.O_RDONLY)
    try:
        if os.fstat(fd).st_size < CATALOG_SIZE:
            raise RecordingError(f"recording catalog {path} is shorter than {CATALOG_SIZE} bytes "
                                 f"(not a recording, or damaged)")
        mm = mmap.mmap(fd, CATALOG_SIZE,
                       prot=mmap.PROT_READ | (mmap.PROT_WRITE if write else 0))
    except BaseException:
        os.close(fd)
        raise
    q = memoryview(mm).cast("Q")
    if q[W_MAGIC] != MAGIC or q[W_VERSION] != VERSION:
        q.release()
        mm.close()
        os.close(fd)
        raise RecordingError(f"{path} is not a version {VERSION} recording catalog")
    return fd, mm, q


def catalog_name(mm: mmap.mmap) -> str:
    (n,) = struct.unpack_from("<I", mm, OFF_NAME)
    return bytes(mm[OFF_NAME + 4:OFF_NAME + 4 + min(n, 1024)]).decode("utf-8", "replace")


class Catalog:
    """A read-only view of one track's catalog words (for readers, ``ls``, metrics)."""

    def __init__(self, track: str):
        self.track = track
        self._fd, self._mm, self.q = open_catalog(track, write=False)
        self.name = catalog_name(self._mm)

    def summary(self) -> dict:
        q = self.q
        committed, first = q[W_COMMITTED], q[W_FIRST_OFFSET]
        return {"channel": self.name, "track": os.path.basename(self.track),
                "mode": MODE_NAMES.get(q[W_MODE], "?"), "bytes": committed - first,
                "messages": q[W_MESSAGES] - q[W_DROPPED], "first_seq": q[W_FIRST_SEQ],
                "next_seq": q[W_NEXT_SEQ], "oldest_ns": q[W_FIRST_TIME],
                "newest_ns": q[W_LAST_TIME], "lost": q[W_LOST], "lag_bytes": q[W_LAG],
                "errors": q[W_ERRORS], "recorded_total": q[W_MESSAGES],
                "start_seq": q[W_START_SEQ]}

    def close(self) -> None:
        self.q.release()
        self._mm.close()
        os.close(self._fd)


def tracks(root: str) -> Iterator[tuple[str, str]]:
    """``(channel name, track path)`` of every track under the recording root ``root``."""
    try:
        entries = sorted(os.listdir(root))
    except FileNotFoundError:
        return
    for entry in entries:
        cdir = os.path.join(root, entry)
        if not os.path.isdir(cdir):
            continue
        for t in sorted(os.listdir(cdir)):
            track = os.path.join(cdir, t)
            if os.path.isfile(os.path.join(track, "catalog")):
                yield channel_name(entry), track


def check_frame(length: int, flags: int, seq: int, expect: int, where: str) -> int:
    """Validate one recorded frame header; return its size.  Recordings hold messages only
    (the recorder never writes a ring's PADs) with strictly growing seq."""
    if flags or length > MAX_FRAME or seq < expect:
        raise RecordingError(f"{where}: bad frame (length {length}, flags {flags:#x}, seq {seq}, "
                             f"expected seq >= {expect})")
    return (length + HEADER + 15) & ~15
