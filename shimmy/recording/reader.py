"""The readers' side of a track: follows the recorder's committed frames in order
(``TrackReader``), and reads a whole track with chunk times for export (``frames_with_time``).

Readers must never write to a recording: they open every file read-only and trust only what the
catalog's commit word covers (docs/recording.md).
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator

from shimmy.recording.layout import (MAX_FRAME, W_COMMITTED, W_FIRST_OFFSET, W_NEXT_SEQ, Catalog,
                                     RecordingError, check_frame, read_entries, seg_path,
                                     segments)
from shimmy.ring import FRAME, HEADER


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
