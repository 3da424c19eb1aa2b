"""``shimmy top``: the daemon's ``stat`` reply, sampled every interval and drawn with rich.Live.

On a terminal it redraws in the alternate screen until Ctrl-C, SIGTERM or a closed terminal
(SIGHUP, a hung-up tty, or a write failing with EIO/EPIPE), each of which ends it quietly with
exit code 0.
When stdout is not a terminal (or with ``--once``) it takes two samples one interval apart and
prints one plain snapshot, rates included.  It only reads: it never changes the daemon's
state.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable

from rich.live import Live

from shimmy.cli_view import PipeAwareConsole, console_for_stdout, top_view
from shimmy.errors import ShimmyError


class _Hangup(Exception):
    """The terminal went away (SIGHUP) or we were asked to stop (SIGTERM)."""


def _on_signal(signum, frame) -> None:
    raise _Hangup()


def _silence_stdio() -> None:
    """The terminal is gone: later writes (rich restoring the screen, the final flush) go to
    /dev/null instead of failing."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.stdout, sys.stderr):
            os.dup2(devnull, stream.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _still_a_terminal() -> bool:
    """False once the terminal hung up (its ioctls fail), even without a SIGHUP: rich then
    stops drawing silently, so the loop has to notice by itself."""
    try:
        return os.isatty(sys.stdout.fileno())
    except (OSError, ValueError):
        return False


def snapshot(sample: Callable[[], dict], interval: float, rows: int | None) -> int:
    """One plain view: two samples ``interval`` apart, so the rates are real."""
    first = sample()
    t0 = time.monotonic()
    time.sleep(interval)
    second = sample()
    console_for_stdout().print(top_view(second, first, time.monotonic() - t0, rows=rows))
    return 0


def run_top(sample: Callable[[], dict], interval: float, once: bool, rows: int | None) -> int:
    console = PipeAwareConsole()
    if once or not console.is_terminal:
        return snapshot(sample, interval, rows)
    for sig in (signal.SIGHUP, signal.SIGTERM):
        signal.signal(sig, _on_signal)
    prev: dict | None = None
    last: dict = {}
    prev_t = time.monotonic()
    try:
        with Live(console=console, auto_refresh=False, screen=True, transient=True,
                  redirect_stdout=False, redirect_stderr=False) as live:
            while True:
                if not _still_a_terminal():
                    raise _Hangup()
                note = "Ctrl-C quits"
                try:
                    snap = sample()
                except ShimmyError as exc:  # daemon restarting or gone: keep showing, retry
                    snap, note = last, f"daemon not answering: {exc}"
                now = time.monotonic()
                visible = rows or max(console.size.height - 14, 3)
                live.update(top_view(snap, prev, now - prev_t, rows=visible, note=note),
                            refresh=True)
                if snap is not last:
                    prev, prev_t, last = snap, now, snap
                time.sleep(max(interval - (time.monotonic() - now), 0.0))
    except KeyboardInterrupt:
        return 0
    except (_Hangup, OSError):
        _silence_stdio()
        return 0
    return 0
