"""The recorder's side of a track: appends chunks of ring frames, rolls segments, keeps the
catalog's words, recovers after a crash and enforces retention (docs/recording.md).

One process writes a track, the holder of the catalog's ``flock``; this module must never be
used by a reader, and never writes a word the format (shimmy/recording/layout.py) does not name.
"""

from __future__ import annotations

import fcntl
import os
import struct
import time

from shimmy.recording.layout import (CATALOG_SIZE, ENTRY, FILE_MODE, IDX_SUFFIX, MAGIC, MAX_FRAME,
                                     MODE_NAMES, MODES, OFF_NAME, SEG_SUFFIX, VERSION,
                                     W_CAPACITY, W_COMMITTED, W_CREATED, W_DROPPED, W_ERRORS,
                                     W_FIRST_OFFSET, W_FIRST_SEQ, W_FIRST_TIME, W_LAG,
                                     W_LAST_TIME, W_LOST, W_MESSAGES, W_MODE, W_NEXT_SEQ,
                                     W_RING_MODE, W_START_SEQ, RecordingError, RecordSettings,
                                     make_dir, open_catalog, read_entries, seg_path, segments)
from shimmy.ring import FRAME, HEADER


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
