"""A channel's recording on disk: segment files of ring frames, a chunk index, a catalog.

The format and its crash argument are in docs/recording.md; the words are named here once.

    DIR/<quoted channel name>/<track>/catalog        4 KiB, mapped: the u64 words W_* below
    DIR/<quoted channel name>/<track>/<offset>.seg   frames exactly as the ring holds them
    DIR/<quoted channel name>/<track>/<offset>.idx   one ENTRY per chunk written to that segment

A track is one publisher's stream of frames (a channel's ring, or one member ring of a
publisher group); ``<offset>`` is the byte offset, in the track's endless stream of frames, at
which the segment starts (20 digits, so names sort in order).  One process writes a track: the
recorder holding the catalog's ``flock``.  Readers never write.
"""

from __future__ import annotations

import dataclasses
import fcntl
import mmap
import os
import struct
import time
import urllib.parse
from collections.abc import Iterator

from shimmy.errors import InvalidArgument, ShimmyError
from shimmy.ring import FRAME, HEADER

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


class TrackWriter:
    """Appends chunks of ring frames to one track (the recorder's side)."""

    def __init__(self, track: str, name: str, mode: str, settings: RecordSettings):
        self.track, self.settings = track, settings
        make_dir(os.path.dirname(track))
        make_dir(track)
        path = os.path.join(track, "catalog")
        fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise RecordingError(f"recording {track} is being written by another recorder "
                                 f"(it holds the lock on {path})") from None
        os.fchmod(fd, FILE_MODE)
        self._lock_fd = fd
        if os.fstat(fd).st_size == 0:
            self._create(fd, name, mode)
        self._cfd, self._mm, self.q = open_catalog(track, write=True)
        if self.q[W_MODE] != MODES[mode]:
            raise RecordingError(f"recording {track} was made in {MODE_NAMES[self.q[W_MODE]]} "
                                 f"mode, not {mode}: record it in that mode or into another "
                                 f"directory")
        self._seg_fd = -1
        self._idx_fd = -1
        self._seg_start = 0
        self._idx_len = 0
        self._recover()

    def _create(self, fd: int, name: str, mode: str) -> None:
        buf = bytearray(CATALOG_SIZE)
        encoded = name.encode()
        struct.pack_into("<QQQ", buf, 0, MAGIC, VERSION, MODES[mode])
        struct.pack_into("<Q", buf, W_CREATED * 8, time.time_ns())
        struct.pack_into("<I", buf, OFF_NAME, len(encoded))
        buf[OFF_NAME + 4:OFF_NAME + 4 + len(encoded)] = encoded
        os.pwrite(fd, buf, 0)
        os.fsync(fd)

    # -- recovery -------------------------------------------------------------------------
    def _recover(self) -> None:
        """Continue a track a dead recorder left: keep every complete frame of its last segment
        (also those written after its last commit, from a reliable ring), cut the rest, and
        commit that."""
        q = self.q
        segs = segments(self.track)
        if not segs:
            return
        start = segs[-1]
        committed = q[W_COMMITTED]
        if committed < start:
            raise RecordingError(f"recording {self.track}: catalog commit {committed} is before "
                                 f"the last segment {start} (damaged)")
        path = seg_path(self.track, start)
        fd = os.open(path, os.O_RDWR)
        size = os.fstat(fd).st_size
        if size < committed - start:
            # The commit word reached the disk and the data did not (a power cut with fsync
            # none): keep the complete frames the file holds, numbered on from its first run.
            first = read_entries(self.track, start)
            committed, nxt = self._complete_frames(fd, start, size,
                                                   first[0][1] if first else 0)
            q[W_NEXT_SEQ] = nxt
            q[W_COMMITTED] = committed
        p, expect, n = committed, q[W_NEXT_SEQ], 0
        first_seq = None
        # Frames written past the commit are kept only from a reliable ring: a lossy ring's
        # publisher may have overwritten them while they were copied (the recorder checks that
        # before its commit; a recorder killed first never did).
        from shimmy.ring import MODE_RELIABLE
        trusted = q[W_RING_MODE] == MODE_RELIABLE + 1
        with os.fdopen(os.dup(fd), "rb") as fh:
            fh.seek(p - start)
            while trusted:
                head = fh.read(HEADER)
                if len(head) < HEADER:
                    break
                length, flags, seq = FRAME.unpack(head)
                if flags or length > MAX_FRAME or seq < expect:
                    break
                end = p + ((length + HEADER + 15) & ~15)
                if end - start > size:
                    break
                fh.seek(end - start)
                if first_seq is None:
                    first_seq = seq
                if q[W_MESSAGES] or n:   # the first message ever starts the numbering
                    q[W_LOST] += seq - expect
                n += 1
                expect = seq + 1
                p = end
        os.ftruncate(fd, p - start)
        # Index entries past the frames kept are cut; frames kept past the old commit get one.
        idx = seg_path(self.track, start, IDX_SUFFIX)
        ifd = os.open(idx, os.O_RDWR | os.O_CREAT, FILE_MODE)
        entries = [e for e in read_entries(self.track, start) if e[0] < p]
        if n and (not entries or entries[-1][0] < committed):
            entries.append((committed, first_seq or 0, time.time_ns(), q[W_MESSAGES]))
        os.ftruncate(ifd, 0)
        os.pwrite(ifd, b"".join(ENTRY.pack(*e) for e in entries), 0)
        self._seg_fd, self._idx_fd = fd, ifd
        self._seg_start, self._idx_len = start, len(entries) * ENTRY.size
        if n:
            if q[W_MESSAGES] == 0:
                q[W_START_SEQ] = q[W_FIRST_SEQ] = first_seq or 0
                q[W_FIRST_TIME] = time.time_ns()
            q[W_MESSAGES] += n
            q[W_NEXT_SEQ] = expect
            q[W_LAST_TIME] = time.time_ns()
        q[W_COMMITTED] = p

    @staticmethod
    def _complete_frames(fd: int, start: int, size: int, expect: int) -> tuple[int, int]:
        """``(end, next seq)`` of the well-formed frames at the start of segment file ``fd``."""
        p = start
        with os.fdopen(os.dup(fd), "rb") as fh:
            while True:
                head = fh.read(HEADER)
                if len(head) < HEADER:
                    break
                length, flags, seq = FRAME.unpack(head)
                end = p + ((length + HEADER + 15) & ~15)
                if flags or length > MAX_FRAME or seq < expect or end - start > size:
                    break
                fh.seek(end - start)
                p, expect = end, seq + 1
        return p, expect

    # -- appending ------------------------------------------------------------------------
    @property
    def next_seq(self) -> int:
        return self.q[W_NEXT_SEQ]

    @property
    def empty(self) -> bool:
        return self.q[W_MESSAGES] == 0

    def _roll(self) -> None:
        """Start a new segment at the commit point (only ever at a chunk boundary)."""
        start = self.q[W_COMMITTED]
        if self._seg_fd >= 0:
            # Cut an uncommitted run (a lossy one the publisher passed) off the finished file.
            os.ftruncate(self._seg_fd, start - self._seg_start)
        for fd in (self._seg_fd, self._idx_fd):
            if fd >= 0:
                os.close(fd)
        self._seg_fd = os.open(seg_path(self.track, start), os.O_RDWR | os.O_CREAT, FILE_MODE)
        os.fchmod(self._seg_fd, FILE_MODE)
        self._idx_fd = os.open(seg_path(self.track, start, IDX_SUFFIX),
                               os.O_RDWR | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        os.fchmod(self._idx_fd, FILE_MODE)
        self._seg_start, self._idx_len = start, 0
        if self.settings.fsync == "data+metadata":
            dfd = os.open(self.track, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def append(self, frames, first_seq: int, next_seq: int, count: int, lost: int,
               lag: int, intact=None, position: int = 0) -> bool:
        """Write one chunk: ``frames`` (a bytes-like of whole frames, messages only, seq from
        ``first_seq`` to ``next_seq - 1``, ``count`` messages, ``lost`` missed before and
        between them), then commit it.  Raises OSError (ENOSPC...) with nothing committed;
        the same chunk may then be retried (it is written again at the same offset).

        ``intact(position)``, when given (a lossy ring), is asked after the copy and before
        the commit whether the ring still held the frames; False leaves the chunk uncommitted
        (its bytes are written over by the next one) and returns False."""
        q = self.q
        committed = q[W_COMMITTED]
        if self._seg_fd < 0 or committed - self._seg_start >= self.settings.segment_bytes:
            self._roll()
            self.enforce_retention()   # size retention per segment; age also once a second
        at = committed - self._seg_start
        n = len(frames)
        done = 0
        with memoryview(frames) as mv:
            while done < n:
                done += os.pwrite(self._seg_fd, mv[done:], at + done)
        if intact is not None and not intact(position):
            return False
        now = time.time_ns()
        os.pwrite(self._idx_fd, ENTRY.pack(committed, first_seq, now, q[W_MESSAGES]),
                  self._idx_len)
        self._idx_len += ENTRY.size
        if self.settings.fsync == "data":
            os.fdatasync(self._seg_fd)
            os.fdatasync(self._idx_fd)
        elif self.settings.fsync == "data+metadata":
            os.fsync(self._seg_fd)
            os.fsync(self._idx_fd)
        if q[W_MESSAGES] == 0:
            q[W_START_SEQ] = first_seq - lost
            q[W_FIRST_SEQ] = first_seq
            q[W_FIRST_TIME] = now
        q[W_NEXT_SEQ] = next_seq
        q[W_LAST_TIME] = now
        q[W_MESSAGES] += count
        q[W_LOST] += lost
        q[W_LAG] = lag
        # COMMIT: readers read frames only below this word (an aligned 8-byte store, after
        # every byte of the chunk reached the page cache: pwrite returned).
        q[W_COMMITTED] = committed + n
        if self.settings.fsync == "data+metadata":
            self._mm.flush()
        return True

    def note_lost(self, lost: int, next_seq: int) -> None:
        """Count messages the recorder dropped (a lossy recording whose write failed): the
        next chunk's first seq shows the gap too, and the counters say it now."""
        self.q[W_LOST] += lost
        self.q[W_NEXT_SEQ] = next_seq

    def note_error(self) -> None:
        self.q[W_ERRORS] += 1

    def set_lag(self, lag: int) -> None:
        self.q[W_LAG] = lag

    def set_shape(self, ring_mode: int, capacity: int) -> None:
        self.q[W_RING_MODE] = ring_mode + 1
        self.q[W_CAPACITY] = capacity

    def shape(self) -> tuple[str | None, int | None]:
        """The recorded channel's ``(mode, capacity)`` (None, None before it was known)."""
        from shimmy.ring import MODE_NAMES as RING_MODES
        mode = RING_MODES.get(self.q[W_RING_MODE] - 1) if self.q[W_RING_MODE] else None
        return mode, (self.q[W_CAPACITY] or None) if mode else None

    # -- retention ------------------------------------------------------------------------
    def enforce_retention(self, now_ns: int | None = None) -> int:
        """Delete the oldest segments (never the one being written) while the track is over
        ``max_bytes`` or a segment's newest chunk is older than ``max_age``; return how many.
        The catalog's first words move before the files go, so a reader that finds a segment
        gone jumps to the new first offset (and counts the messages it missed there)."""
        s, q = self.settings, self.q
        if not s.max_bytes and not s.max_age:
            return 0
        now = time.time_ns() if now_ns is None else now_ns
        segs = segments(self.track)
        removed = 0
        while len(segs) > 1:
            nxt = read_entries(self.track, segs[1])
            if not nxt:
                break
            over_size = s.max_bytes and q[W_COMMITTED] - segs[0] > s.max_bytes
            newest = nxt[0][2]   # the next segment's first chunk came after all of this one
            too_old = s.max_age and newest < now - int(s.max_age * 1e9)
            if not (over_size or too_old):
                break
            offset, seq, t, before = nxt[0]
            q[W_FIRST_SEQ] = seq
            q[W_FIRST_TIME] = t
            q[W_DROPPED] = before
            q[W_FIRST_OFFSET] = offset
            for suffix in (SEG_SUFFIX, IDX_SUFFIX):
                try:
                    os.unlink(seg_path(self.track, segs[0], suffix))
                except FileNotFoundError:
                    pass
            segs.pop(0)
            removed += 1
        return removed

    def close(self) -> None:
        for fd in (self._seg_fd, self._idx_fd):
            if fd >= 0:
                os.close(fd)
        self._seg_fd = self._idx_fd = -1
        self.q.release()
        self._mm.close()
        os.close(self._cfd)
        os.close(self._lock_fd)


class TrackReader:
    """Reads one track's committed frames in order, following the recorder as it appends.

    :meth:`next` returns ``(seq, payload view, lost)``; the view is valid until the next call.
    A segment deleted by retention before it was opened makes the reader jump to the oldest
    kept one; the seq gap then counts in ``lost`` like any other.
    """

    def __init__(self, track: str):
        self.track = track
        self.cat = Catalog(track)
        self.q = self.cat.q
        self.offset = self.q[W_FIRST_OFFSET]   # stream offset of the next frame
        self.expect = -1                      # seq expected next (-1: the first read sets it)
        self._fd = -1
        self._seg = -1                        # start of the open segment
        self._seg_end = -1                    # its size when known to be final
        # The open segment, mapped read-only up to its size when mapped (remapped as the
        # recorder appends): a message is one copy, a slice of the mapping.  A view handed out
        # by next() keeps an old mapping alive after a remap.
        self._buf: mmap.mmap | bytes = b""
        self._bstart = 0                      # stream offset of _buf[0] (the segment's start)
        self._blen = 0                        # bytes mapped

    def committed(self) -> int:
        return self.q[W_COMMITTED]

    def next_seq(self) -> int:
        return self.q[W_NEXT_SEQ]

    # -- positioning --------------------------------------------------------------------
    def _entries(self) -> list[tuple[int, int, int, int]]:
        out: list[tuple[int, int, int, int]] = []
        for s in segments(self.track):
            out.extend(read_entries(self.track, s))
        return out

    def seek_seq(self, seq: int) -> None:
        """Position at the first recorded message with a seq >= ``seq``."""
        best = self.q[W_FIRST_OFFSET]
        for offset, first, _, _ in self._entries():
            if first <= seq and offset >= best:
                best = offset
        self._goto(best)
        self._skip_below(seq)

    def seek_time(self, ns: int) -> None:
        """Position at the first chunk recorded at or after ``ns`` (ns since the epoch)."""
        for offset, first, t, _ in self._entries():
            if t >= ns and offset >= self.q[W_FIRST_OFFSET]:
                self._goto(offset)
                self.expect = first
                return
        self._goto(self.committed())
        self.expect = self.next_seq()

    def _goto(self, offset: int) -> None:
        self.offset = offset

    def _skip_below(self, seq: int) -> None:
        """Step over recorded frames below ``seq``; the next frame's ``lost`` then counts from
        ``seq`` (the recording lacks what lies between)."""
        self.expect = -1
        while True:
            got = self._frame()
            if got is None:
                break
            fseq, _, size = got
            if fseq >= seq:
                break
            self.offset += size
            self.expect = fseq + 1
        self.expect = seq

    # -- reading ------------------------------------------------------------------------
    def _open_segment(self) -> bool:
        """Open the segment holding ``self.offset``; False when it was deleted (jumped)."""
        segs = segments(self.track)
        cands = [s for s in segs if s <= self.offset]
        if not cands:
            first = self.q[W_FIRST_OFFSET]
            if first > self.offset:
                self._goto(first)
                return False
            raise RecordingError(f"recording {self.track}: no segment holds offset "
                                 f"{self.offset}")
        start = cands[-1]
        if self._fd >= 0:
            os.close(self._fd)
        try:
            self._fd = os.open(seg_path(self.track, start), os.O_RDONLY)
        except FileNotFoundError:
            self._fd = -1
            self._goto(max(self.offset, self.q[W_FIRST_OFFSET]))
            return False
        self._seg = start
        self._buf, self._bstart, self._blen = b"", start, 0
        later = [s for s in segs if s > start]
        self._seg_end = later[0] if later else -1
        return True

    def _fill(self, need: int, limit: int) -> bool:
        """Make ``need`` bytes at ``self.offset`` readable in the mapping (below ``limit``)."""
        if self.offset + need > limit:
            return False
        if self._fd >= 0 and self._bstart <= self.offset and \
                self.offset - self._bstart + need <= self._blen:
            return True
        while True:
            if self._fd < 0 or self.offset < self._seg or (
                    self._seg_end >= 0 and self.offset >= self._seg_end):
                self._open_segment()   # on False it jumped past deleted segments: again
                continue
            if self._seg_end < 0:
                later = [s for s in segments(self.track) if s > self._seg]
                if later:
                    # Ours is complete: it ends where the next one starts (the file may hold
                    # an uncommitted run past that end, never read).  Retention deletes the
                    # oldest first, so the next one exists while ours does; once ours was
                    # deleted (we hold it open), it ends at its size: the recorder cut it to
                    # its committed end when it began the next.
                    st = os.fstat(self._fd)
                    self._seg_end = self._seg + st.st_size if st.st_nlink == 0 else later[0]
                    continue
            break
        # Map what the file holds now: everything below ``limit`` in this segment was written
        # before the recorder committed it.  Bytes past the commit may be mapped too; readers
        # never look at them.
        size = os.fstat(self._fd).st_size
        if self._seg_end >= 0:
            size = min(size, self._seg_end - self._seg)
        if size > self._blen or self._bstart != self._seg:
            self._buf = mmap.mmap(self._fd, size, prot=mmap.PROT_READ) if size else b""
            self._bstart, self._blen = self._seg, size
        return self.offset - self._bstart + need <= self._blen

    def _frame(self) -> tuple[int, memoryview, int] | None:
        limit = self.committed()
        if self.offset >= limit or not self._fill(HEADER, limit):
            return None
        rel = self.offset - self._bstart
        length, flags, seq = FRAME.unpack_from(self._buf, rel)
        size = check_frame(length, flags, seq, max(self.expect, 0),
                           f"recording {self.track} at offset {self.offset}")
        if not self._fill(size, limit):
            raise RecordingError(
                f"recording {self.track}: the frame at {self.offset} ends past the committed "
                f"end {limit} or past its segment file (damaged: a commit past what reached "
                f"the disk, as a power cut with fsync none can leave; a recorder continuing "
                f"the recording repairs it)")
        rel = self.offset - self._bstart
        return seq, memoryview(self._buf)[rel + HEADER:rel + HEADER + length], size

    def next(self) -> tuple[int, memoryview, int] | None:
        """The next committed message ``(seq, payload, lost)``, or None when caught up."""
        got = self._frame()
        if got is None:
            return None
        seq, view, size = got
        lost = seq - self.expect if self.expect >= 0 else 0
        self.offset += size
        self.expect = seq + 1
        return seq, view, lost

    def read_many(self, max_n: int, below: int) -> tuple[list[bytes], int]:
        """Copy out up to ``max_n`` committed messages with a seq below ``below``, in order:
        ``(payloads, lost)`` with ``lost`` the seq gaps before and between them; afterwards
        ``expect`` is the seq after the last one.  Stops early when caught up or at a message
        numbered ``below`` or later (left unread).  The copy path of :meth:`next`: one tight
        loop over the frames already mapped, a remap when it runs out."""
        out: list[bytes] = []
        append = out.append
        lost = count = 0
        unpack = FRAME.unpack_from
        while count < max_n:
            limit = self.committed()
            if self.offset >= limit or not self._fill(HEADER, limit):
                break
            data, base = self._buf, self._bstart
            blen = min(self._blen, limit - base)   # never past the commit
            rel = self.offset - base
            expect = self.expect
            while count < max_n and rel + HEADER <= blen:
                length, flags, seq = unpack(data, rel)
                nxt = rel + ((length + HEADER + 15) & ~15)
                if nxt > blen:
                    break                  # the frame's end is not mapped (or committed)
                if flags or seq != expect or length > MAX_FRAME or seq >= below:
                    # off the common path: invalid, a gap, the first frame, or the bound
                    if flags or length > MAX_FRAME or seq < expect:
                        check_frame(length, flags, seq, max(expect, 0),
                                    f"recording {self.track} at offset {base + rel}")
                    if seq >= below:
                        self.offset, self.expect = base + rel, expect
                        return out, lost
                    if expect >= 0:
                        lost += seq - expect
                append(data[rel + HEADER:rel + HEADER + length])
                rel = nxt
                expect = seq + 1
                count += 1
            self.offset = base + rel
            self.expect = expect
            if rel + HEADER <= blen and count < max_n:
                # A frame that ends past the mapping: map again and read it whole.
                got = self._frame()
                if got is None or got[0] >= below:
                    break
                seq, view, size = got
                if self.expect >= 0:
                    lost += seq - self.expect
                append(bytes(view))
                count += 1
                self.offset += size
                self.expect = seq + 1
        return out, lost

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.cat.close()


def frames_with_time(track: str) -> Iterator[tuple[int, int, bytes]]:
    """``(seq, time ns, payload)`` of every kept message of a track (export)."""
    segs = segments(track)
    for i, start in enumerate(segs):
        entries = read_entries(track, start)
        try:
            with open(seg_path(track, start), "rb") as fh:
                data = fh.read()
        except FileNotFoundError:
            continue   # deleted by retention meanwhile
        cat = Catalog(track)
        try:
            limit = cat.q[W_COMMITTED] - start
        finally:
            cat.close()
        if i + 1 < len(segs):
            limit = min(limit, segs[i + 1] - start)   # a segment ends where the next starts
        p, k, t = 0, 0, 0
        end = min(len(data), limit)
        while p + HEADER <= end:
            while k < len(entries) and entries[k][0] - start <= p:
                t = entries[k][2]
                k += 1
            length, flags, seq = FRAME.unpack_from(data, p)
            size = check_frame(length, flags, seq, 0, f"recording {track} at {start + p}")
            if p + size > end:
                break
            yield seq, t, data[p + HEADER:p + HEADER + length]
            p += size

