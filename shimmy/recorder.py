"""The recorder: a subscriber of a channel's ring that copies its frames, unchanged, to disk.

It reads the ring like any subscriber (its own slot; in reliable mode the publisher waits for
it), but instead of handing out messages it walks the committed frames from its position and
writes each contiguous run of messages with one ``pwrite`` straight from the shared mapping
(PADs are skipped: a recording holds messages only), commits the run in the catalog, and only
then releases the ring's bytes (docs/recording.md, "The recorder").
"""

from __future__ import annotations

import errno
import fnmatch
import logging
import os
import threading
import time
from typing import Any

from shimmy import recording, ring
from shimmy.errors import (ChannelClosed, ChannelConflict, DaemonUnavailable, InvalidArgument,
                           ReceiveTimeout, ShimmyError)
from shimmy.recording import RecordSettings, TrackWriter
from shimmy.recording_registry import register, registry_dir
from shimmy.sdk.channel import Channel
from shimmy.sdk.client import get_client

log = logging.getLogger("shimmy.record")
_ATTACH = threading.Lock()

CHUNK_BYTES = 1 << 20      # a run written at once is at most this (or a quarter of the ring)
SKIP_FILL = 0.75           # lossy recorder on a reliable ring: skip ahead past this fill
ERROR_LOG_EVERY = 5.0      # seconds between two log lines about the same failing write
RETRY_AFTER = 0.05         # a failed write (disk full) is tried again after this


def member_track(publisher: int, node: str | None, created_ns: int) -> str:
    """A publisher group member's track: its publisher id and node, and its ring's creation
    time (ids start again with a new daemon; each member ring numbers its messages from 0)."""
    return recording.quote(f"p{publisher}.{node or '-'}.{created_ns:x}")


class _Track:
    """One ring recorded into one track: our slot's reader in that ring (a channel's ring, or
    one publisher's member ring of a group) and the track's writer."""

    def __init__(self, owner: "ChannelRecorder", reader: ring.RingReader, view: ring.RingView,
                 writer: TrackWriter):
        self.owner, self.r, self.v, self.writer = owner, reader, view, writer
        self._q, self._mv = view.q, view.mv
        self._base, self._cap = view.data_offset, view.capacity
        self._mask = view.capacity - 1
        self._max = ring.max_message_size(view.capacity)
        self._chunk = min(CHUNK_BYTES, view.capacity // 4)
        self._lossy_ring = view.mode == ring.MODE_LOSSY
        # Frames the track already has (seq below its next seq) are skipped, so a recorder
        # continuing a track, or reattaching after a daemon restart, records each message once.
        self._skip_from = writer.next_seq if not writer.empty else 0
        # The seq the next recorded message should have: a gap before it is a loss.  A new
        # track expects the seq at which its slot started (messages published after the
        # recorder subscribed and missed before its first run count too).
        self._expect = writer.next_seq if not writer.empty else reader._expect

    def step(self) -> int | None:
        """Record the next run of committed frames; the number of messages, or None when
        caught up."""
        r, q, mv = self.r, self._q, self._mv
        p = r.position
        tail = q[ring.W_TAIL]
        if tail == p:
            return None
        if tail < p or tail & 15:
            r._bad_tail(tail)
        if self.owner.mode == "lossy" and not self._lossy_ring and \
                tail - p > self._cap * SKIP_FILL:
            # A lossy recording never holds a reliable publisher back: past this fill the
            # recorder skips to the tail; the next frame's seq counts the gap exactly.
            self._release(tail)
            return 0
        start = p
        wrap = p + (self._cap - (p & self._mask))
        limit = min(tail, wrap, p + self._chunk)
        first = -1
        expect = self._expect
        count = lost = 0
        base, mask, largest, skip = self._base, self._mask, self._max, self._skip_from
        unpack = ring.FRAME.unpack_from
        while p < tail:
            length, flags, seq = unpack(mv, base + (p & mask))
            end = p + ((length + 31) & ~15)
            if seq == expect and count and not flags and end <= limit and length <= largest:
                count += 1      # the common case: the next message, in order, within the run
                expect = seq + 1
                p = end
                continue
            if flags:
                if flags != ring.FLAG_PAD or length & 15 or p + length + 16 > tail:
                    return self._bad(start, p, length, flags)
                if p > start:
                    break          # the run ends before the PAD
                p = start = p + length + 16
                continue
            if length > largest or end > tail:
                return self._bad(start, p, length, flags)
            if (end > limit and p > start) or p >= wrap:
                break
            if seq < skip:          # already in the recording
                if p > start:
                    break
                p = start = end
                continue
            if first < 0:
                first = seq
            if seq != expect:
                if seq < expect:
                    return self._bad(start, p, length, flags)
                lost += seq - expect
            expect = seq + 1
            count += 1
            p = end
        if p == start:                  # only PADs or frames already recorded
            self._release(p)
            return 0
        try:
            with mv[base + (start & mask):base + (p & mask or self._cap)] as run:
                # Lossy ring: the head is loaded after the copy and before the commit; a
                # publisher that passed the run meanwhile makes it uncommitted (lapped).
                intact = self._intact_from if self._lossy_ring else None
                if not self.writer.append(run, first, expect, count, lost, tail - p,
                                          intact, start):
                    return self._lapped()
        except OSError as exc:
            return self._failed(exc, p, expect, count + lost)
        self._skip_from = self._expect = expect
        self._release(p)   # only now: the run is committed in the recording
        return count

    def _intact_from(self, start: int) -> bool:
        return self._q[ring.W_HEAD] <= start

    def _release(self, p: int) -> None:
        self.r.position = p
        self.r.release_to(p)

    def _lapped(self) -> int:
        """The lossy publisher overwrote frames we had not recorded: jump to its head; the
        next frame's seq counts what was missed."""
        head = self._q[ring.W_HEAD]
        self.r._resync(head)
        self.r.release_to(head)
        return 0

    def _bad(self, start: int, p: int, length: int, flags: int) -> int:
        if self._q[ring.W_HEAD] > start:
            return self._lapped()   # torn by a lossy publisher, not corrupt
        raise ring.corrupted(self.v, f"frame at position {p} (length {length}, flags "
                             f"{flags:#x}, while recording) is not a valid frame",
                             self._base + (p & self._mask))

    def _failed(self, exc: OSError, p: int, nxt: int, missed: int) -> int:
        """A write failed (disk full, I/O error): logged, counted; then the mode decides.
        Reliable: nothing is released, so the publisher waits (and its publish times out with
        BackpressureTimeout) until the write succeeds.  Lossy: the run is dropped and the gap
        counted at once (``missed``: its messages and the gap before them)."""
        self.writer.note_error()
        self.owner.log_failure(exc)
        if self.owner.mode == "lossy":
            self.writer.note_lost(missed, nxt)
            self._release(p)
            self._skip_from = self._expect = nxt
            return 0
        time.sleep(RETRY_AFTER)
        return 0


class ChannelRecorder:
    """Records one channel into ``root``: one track, or for a publisher group one track per
    publisher (member ring), each in its publisher's order."""

    def __init__(self, name: str, root: str, mode: str = "reliable",
                 settings: RecordSettings | None = None, daemon: str | None = None):
        if mode not in recording.MODES:
            raise InvalidArgument(f"record mode must be one of {sorted(recording.MODES)}, got "
                                  f"{mode!r}")
        self.name, self.root, self.mode, self.daemon = name, root, mode, daemon
        self.settings = settings or RecordSettings()
        self.cdir = recording.channel_dir(root, name)
        recording.make_dir(root)
        recording.make_dir(self.cdir)
        self.writers: dict[str, TrackWriter] = {}   # track name -> writer, kept across reattach
        self.tracks: dict[int, _Track] = {}         # member id (0: the channel's ring) -> track
        self.group = False
        self.ch: Any = None   # the Channel (None while reattaching)
        self._last_error = 0.0
        self._last_retention = 0.0
        self.stopped = False
        self.error: Exception | None = None
        try:
            self._attach()
        except BaseException:
            self._close_writers()
            raise
        try:
            register(self.socket, name, self.cdir)   # after the slot is taken: it records
        except OSError as exc:
            # e.g. a system daemon's socket directory this user may not write: the recording
            # works, but joins must name it (subscribe(..., recording=DIR)) and the daemon
            # does not continue its numbering after a restart.
            log.warning("recording %r: cannot register it beside the daemon's socket (%s: %s); "
                        "subscribe(start=...) needs recording=%r", name,
                        registry_dir(self.socket), exc.strerror or exc, root)

    def _writer(self, track: str) -> TrackWriter:
        w = self.writers.get(track)
        if w is None:
            w = self.writers[track] = TrackWriter(os.path.join(self.cdir, track), self.name,
                                                  self.mode, self.settings)
        return w

    # -- attaching ------------------------------------------------------------------------
    def _attach(self) -> None:
        """Open the channel and take a slot at the oldest message each ring holds."""
        main = os.path.join(self.cdir, recording.MAIN_TRACK)
        mode = capacity = None
        if os.path.isfile(os.path.join(main, "catalog")):
            mode, capacity = self._writer(recording.MAIN_TRACK).shape()
        try:
            # A channel made again (after a daemon restart) gets its recorded shape.
            ch = Channel(self.name, daemon=self.daemon, mode=mode, capacity=capacity)
        except ChannelConflict:
            ch = Channel(self.name, daemon=self.daemon)   # made since with another shape
        try:
            if self.mode == "reliable" and ch.mode == "lossy":
                raise InvalidArgument(f"channel {self.name!r} is lossy: a reliable recording "
                                      f"needs a reliable channel (record it with --mode lossy)")
            # No spin: a recorder writes runs of up to 1 MiB and may as well sleep between
            # them; spinning took CPU from the publisher and subscribers it shares cores with
            # (bench, recording cost at 4 KiB on 2 cores: 0.64x with a 50 us spin, 0.87-1.08x
            # without).
            self.sub = ch.subscribe("oldest", spin_us=0)
        except BaseException:
            ch.close()
            raise
        self.ch = ch
        self.socket = ch._client.path
        self.group = ch.max_publishers > 1
        self.tracks = {}
        if self.group:
            self._sync_members()
            live = {os.path.basename(t.writer.track) for t in self.tracks.values()}
            for name in [n for n in self.writers if n not in live]:
                self.writers.pop(name).close()   # members of the ring before a restart
        else:
            w = self._writer(recording.MAIN_TRACK)
            w.set_shape(ring.MODES[ch.mode], ch.capacity)
            self.tracks[0] = _Track(self, self.sub._reader, ch._view, w)

    def _sync_members(self) -> None:
        """A group: a track for each member ring the subscription reads now.  A member that
        left was read to its end first (the daemon reclaims it only once every subscriber,
        this recorder included, drained it), so its track is complete: its writer closes."""
        sub = self.sub
        if sub._gq[ring.I_GROUP_EPOCH] != sub._gepoch:
            sub._refresh()
        now = {m.id: m for m in sub._members}
        for mid in [k for k in self.tracks if k not in now]:
            track = self.tracks.pop(mid)
            name = os.path.basename(track.writer.track)
            self.writers.pop(name).close()
        for mid, m in now.items():
            if mid not in self.tracks:
                created = m.view.q[ring.W_CREATED]
                w = self._writer(member_track(mid, m.reader.node, created))
                w.set_shape(ring.MODES[self.ch.mode], m.view.capacity)
                self.tracks[mid] = _Track(self, m.reader, m.view, w)

    def _reattach(self) -> None:
        """After ChannelClosed (the channel was deleted or its daemon restarted)."""
        try:
            self.ch.close()
        except Exception:   # noqa: BLE001 - the old daemon is gone; nothing to hand back
            pass
        self.ch = None
        while not self.stopped:
            try:
                with _ATTACH:   # recorders of one process share its daemon client
                    self._attach()
                log.info("recording %r: reattached to the channel", self.name)
                return
            except (DaemonUnavailable, ChannelClosed):
                time.sleep(0.1)

    # -- recording ------------------------------------------------------------------------
    def step(self) -> int | None:
        """Record a run of each ring that has committed frames; the number of messages, or
        None when every ring is caught up (the subscription's wait calls it as its
        ``attempt``)."""
        if self.group and self.sub._gq[ring.I_GROUP_EPOCH] != self.sub._gepoch:
            self._sync_members()
        got = None
        for track in list(self.tracks.values()):
            n = track.step()
            if n is not None:
                got = (got or 0) + n
        return got

    def log_failure(self, exc: OSError) -> None:
        now = time.monotonic()
        if now - self._last_error >= ERROR_LOG_EVERY:
            self._last_error = now
            what = "full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else "failing"
            then = ("the publisher is held back until it has room" if self.mode == "reliable"
                    else "messages are dropped (counted as lost) until it has room")
            log.error("recording %r: cannot write to %s: %s (disk %s); %s", self.name,
                      self.cdir, os.strerror(exc.errno or 0) or exc, what, then)

    def retention(self) -> None:
        now = time.monotonic()
        if now - self._last_retention >= 1.0:
            self._last_retention = now
            for w in list(self.writers.values()):
                w.enforce_retention()

    def poll(self, timeout: float = 0.25) -> int:
        """Record whatever is committed, waiting up to ``timeout`` for something."""
        try:
            got = self.step()
            if got is None:
                got = self.sub._wait(timeout, self.step)
            self.retention()
            return got or 0
        except ReceiveTimeout:
            for w in list(self.writers.values()):
                w.set_lag(0)
            self.retention()
            return 0
        except ChannelClosed:
            self._reattach()
            return 0

    def run(self) -> None:
        """Record until :meth:`close` (or ``stopped``); an error that ends the recording is
        logged and kept in ``error``."""
        try:
            while not self.stopped:
                self.poll()
        except Exception as exc:   # noqa: BLE001 - logged, and the caller reads .error
            self.error = exc
            log.error("recording %r stopped: %s: %s", self.name, type(exc).__name__, exc)

    def _close_writers(self) -> None:
        for w in self.writers.values():
            w.close()
        self.writers.clear()

    def close(self, tell_daemon: bool = True) -> None:
        """Stop; ``tell_daemon=False`` (a process about to exit, maybe because its daemon is
        stopping) leaves the slot to the daemon's reclaim of the exiting process."""
        self.stopped = True
        if self.ch is not None and tell_daemon:
            self.ch.close()
        self._close_writers()


class RecorderSet:
    """The recorders of one process (``shimmy record``, the daemon's recorder): the channels
    named, and, given glob ``patterns``, every channel matching one that exists on the daemon or
    has a recording under ``root`` (looked for once a second; a recorded channel that does not
    exist, after a daemon restart, is opened and so made again).  One thread per channel."""

    def __init__(self, names: list[str], patterns: list[str], root: str, mode: str,
                 settings: RecordSettings, daemon: str | None):
        self.patterns, self.root, self.mode = patterns, root, mode
        self.settings, self.daemon = settings, daemon
        self.recs: dict[str, ChannelRecorder] = {}
        self._threads: list[threading.Thread] = []
        self._refused: set[str] = set()
        try:
            for name in names:
                self._add(name)
        except BaseException:
            self.close()
            raise

    def _add(self, name: str) -> None:
        with _ATTACH:
            rec = ChannelRecorder(name, self.root, self.mode, self.settings, self.daemon)
        self.recs[name] = rec
        log.info("recording %r (%s) into %s", name, self.mode, rec.cdir)
        t = threading.Thread(target=rec.run, name=f"record {name}", daemon=True)
        t.start()
        self._threads.append(t)

    def discover(self) -> None:
        """Start recording every channel matching a pattern that is not recorded yet."""
        if not self.patterns:
            return
        # Recorded single-publisher channels are opened (made again) even when absent; a group
        # is recorded when it exists (opening an absent one would make an exclusive channel).
        names = {n for n, t in recording.tracks(self.root)
                 if os.path.basename(t) == recording.MAIN_TRACK}
        try:
            with _ATTACH:
                listed = get_client(self.daemon).request("list")["channels"]
        except (DaemonUnavailable, ChannelClosed):
            return   # restarting: the next pass looks again
        names.update(c["name"] for c in listed)
        for name in sorted(names):
            if name in self.recs or name in self._refused or \
                    not any(fnmatch.fnmatchcase(name, p) for p in self.patterns):
                continue
            try:
                self._add(name)
            except (ShimmyError, OSError) as exc:
                self._refused.add(name)   # logged once; a restart of the recorder retries
                log.error("not recording %r: %s", name, exc)

    def alive(self) -> bool:
        return bool(self.patterns) or any(t.is_alive() for t in self._threads)

    def errors(self) -> list[str]:
        return [f"recording {r.name!r} stopped: {r.error}" for r in self.recs.values()
                if r.error is not None]

    def run(self, stop: threading.Event) -> None:
        while self.alive() and not stop.is_set():
            self.discover()
            stop.wait(1.0)

    def close(self) -> None:
        """Stop every recorder (each commits the run it is writing); the process exits next,
        and the daemon reclaims the slots with it (the daemon may be the one stopping us)."""
        for rec in self.recs.values():
            rec.stopped = True
        for t in self._threads:
            t.join(2.0)
        for rec in self.recs.values():
            rec.close(tell_daemon=False)
