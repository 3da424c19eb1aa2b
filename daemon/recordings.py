"""The daemon's side of recorded channels (docs/recording.md, "In the daemon").

Two jobs, each called from the server by one line:

- ``on_created(rec)`` (a channel record was just made, before any client maps its ring): when the
  channel has a recording (registered beside our socket by its recorder, the daemon's own or a
  ``shimmy record``), the empty ring is positioned where the recording ends, so the numbering
  continues after a restart of the daemon (a SIGKILL included) and subscribers resume by
  sequence number.  The daemon stores the ring's publisher words here as it does for a carried
  stream (spec/ring.md, "Carried streams"): nobody holds the publisher role yet.
- the recorder process the settings ask for (``record`` patterns into ``record_dir``): started
  with the daemon (it opens the recorded channels again), restarted when it dies, stopped with
  the daemon, and killed by the kernel when the daemon dies (``PR_SET_PDEATHSIG``), so a killed
  daemon leaves no recorder holding a recording against its successor's.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time

from shimmy import recording, ring
from shimmy.recording_registry import lookup

from .peer.mirror import seed_stream

log = logging.getLogger("shimmy.daemon")

PR_SET_PDEATHSIG = 1
RESTART_AFTER = 1.0     # seconds before a recorder that exited is started again, doubled
RESTART_MAX = 60.0      # (up to this) while it keeps exiting within STABLE seconds of its start
STABLE = 10.0
STOP_WAIT = 5.0         # seconds a stopping recorder gets before SIGKILL


def _die_with_parent() -> None:   # runs in the child between fork and exec
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


class Recordings:
    def __init__(self, settings, socket_path: str):
        self.settings = settings
        self.socket = socket_path
        self.proc: subprocess.Popen | None = None
        self._died_at: float | None = None
        self._started_at = 0.0
        self._quick_exits = 0   # exits in a row within STABLE seconds of a start
        self._delay = RESTART_AFTER

    # -- numbering across restarts ----------------------------------------------------------
    def on_created(self, rec) -> None:
        """Continue a recorded channel's numbering in its new (empty) ring."""
        if rec.max_publishers > 1 or rec.view.link_state() != "local":
            return   # groups are not recorded; a replica's numbers are its source's
        cdir = lookup(self.socket, rec.name)
        if cdir is None:
            return
        try:
            cat = recording.Catalog(os.path.join(cdir, recording.MAIN_TRACK))
        except (OSError, recording.RecordingError) as exc:
            log.warning("channel %s: its recording in %s cannot be read (%s); its numbering "
                        "starts at 0", rec.name, cdir, exc)
            return
        try:
            nxt = cat.q[recording.W_NEXT_SEQ]
        finally:
            cat.close()
        if nxt == 0 or rec.view.q[ring.W_TAIL] != 0 or nxt >= ring.U64:
            return
        seed_stream(rec.view, ring.HEADER, nxt)
        log.info("channel %s: recorded in %s; its numbering continues at seq %d", rec.name,
                 cdir, nxt)

    # -- the recorder process ---------------------------------------------------------------
    def _command(self) -> list[str]:
        s = self.settings
        cmd = [sys.executable, "-m", "shimmy.cli", "record", "--daemon", self.socket, "--dir",
               s.record_dir, "--mode", s.record_mode, "--segment-size", str(s.record_segment_bytes),
               "--max-bytes", str(s.record_max_bytes), "--max-age", str(s.record_max_age),
               "--fsync", s.record_fsync]
        for pattern in s.record:
            cmd += ["--pattern", pattern]
        return cmd

    def start(self) -> None:
        if not self.settings.record:
            return
        self.proc = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent, close_fds=True)
        self._started_at = time.monotonic()
        log.info("recorder started (pid %d): %s into %s (%s)", self.proc.pid,
                 ", ".join(self.settings.record), self.settings.record_dir,
                 self.settings.record_mode)

    def tick(self, now: float) -> None:
        """Start the recorder again a while after it exited."""
        proc = self.proc
        if proc is None or proc.poll() is None:
            return
        if self._died_at is None:
            self._died_at = now
            self._quick_exits = self._quick_exits + 1 if now - self._started_at < STABLE else 0
            self._delay = min(RESTART_AFTER * 2 ** max(self._quick_exits - 1, 0), RESTART_MAX)
            log.error("recorder (pid %d) exited with %s; starting it again in %.0f s", proc.pid,
                      proc.returncode, self._delay)
        elif now - self._died_at >= self._delay:
            self._died_at = None
            self.start()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(STOP_WAIT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
