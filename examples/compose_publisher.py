"""Publish N checksummed messages on a shimmy channel, then print one summary line.

Used by deploy/compose/compose.yaml and the container tests; runs anywhere the SDK can reach a
daemon (``$SHIMMY_DAEMON`` or /run/shimmy/shimmyd.sock).

Environment:
  SHIMMY_CHANNEL   channel name (default demo/compose)
  SHIMMY_COUNT     messages to publish (default 10000); 0 = publish for ever (a long-running
                   workload such as the Kubernetes example), reopening the channel whenever the
                   node's daemon is replaced (see "Daemon upgrades" in docs/containers.md)
  SHIMMY_SIZE      payload bytes per message, at least 32 (default 256)
  SHIMMY_MODE      reliable | lossy (default reliable)
  SHIMMY_RATE      messages per second, 0 = as fast as the ring allows (default 0)
  SHIMMY_TIMEOUT   overall limit in seconds (default 300)
  SHIMMY_SEED      payload seed, shared with the subscriber (default shimmy)
  SHIMMY_WAIT_FILE wait (within SHIMMY_TIMEOUT) until this file exists before publishing: the
                   subscriber's SHIMMY_READY_FILE on a shared volume (Kubernetes example pod)
  SHIMMY_REPORT_EVERY  with SHIMMY_COUNT=0: seconds between summary lines (default 10)

Message layout (the subscriber checks all of it):
  index u64 | body length u32 | body (derived from seed and index) | blake2b-16(index..body)

Summary line: ``publisher: sent=N channel=C bytes=B seconds=S rate=R/s digest=HEX retries=K``;
``digest`` is a blake2b over every payload in order, which the subscriber reports too.
Exit status 0 when all N were published, 1 otherwise.  With SHIMMY_COUNT=0 it never exits by
itself; the summary line then also says ``reopens=K`` (channels reopened after the daemon went
away) and comes every SHIMMY_REPORT_EVERY seconds.
"""

from __future__ import annotations

import hashlib
import os
import struct
import sys
import time

import shimmy

HEADER = struct.Struct("<QI")
CHECK = 16


def payload(seed: bytes, index: int, size: int) -> bytes:
    """Deterministic payload of ``size`` bytes for message ``index``."""
    body_len = size - HEADER.size - CHECK
    block = hashlib.blake2b(seed + index.to_bytes(8, "little"), digest_size=64).digest()
    body = (block * (body_len // len(block) + 1))[:body_len]
    head = HEADER.pack(index, body_len)
    return head + body + hashlib.blake2b(head + body, digest_size=CHECK).digest()


def daemon_instance() -> tuple[int, int] | None:
    """Which daemon is serving: the (device, inode) of its control socket file.  A daemon that
    restarts (a rolling update, a crash) makes a new socket file, and every channel opened
    through the old one is gone with it: a long-running app compares this value and reopens."""
    try:
        st = os.stat(os.environ.get("SHIMMY_DAEMON") or "/run/shimmy/shimmyd.sock")
    except OSError:
        return None
    return st.st_dev, st.st_ino


class DaemonReplaced(Exception):
    """The daemon this app opened its channel through is no longer the one serving."""


def channel_and_count(role: str) -> tuple[str, int]:
    """SHIMMY_CHANNEL and SHIMMY_COUNT (0 = for ever); a negative count ends the app with
    status 2 and a line naming the rule."""
    channel = os.environ.get("SHIMMY_CHANNEL", "demo/compose")
    count = int(os.environ.get("SHIMMY_COUNT", "10000"))
    if count < 0:
        print(f"{role}: SHIMMY_COUNT must be >= 0 (0 = for ever), got {count}", flush=True)
        raise SystemExit(2)
    return channel, count


def main() -> int:
    channel, count = channel_and_count("publisher")
    forever = count == 0
    report_every = float(os.environ.get("SHIMMY_REPORT_EVERY", "10"))
    size = max(HEADER.size + CHECK, int(os.environ.get("SHIMMY_SIZE", "256")))
    mode = os.environ.get("SHIMMY_MODE", "reliable")
    rate = float(os.environ.get("SHIMMY_RATE", "0"))
    limit = float(os.environ.get("SHIMMY_TIMEOUT", "300"))
    seed = os.environ.get("SHIMMY_SEED", "shimmy").encode()

    start = time.monotonic()
    deadline = start + limit
    wait_file = os.environ.get("SHIMMY_WAIT_FILE")
    if wait_file:
        while not os.path.exists(wait_file):
            if time.monotonic() > deadline:
                print(f"publisher: {wait_file} did not appear within {limit}s", flush=True)
                return 1
            time.sleep(0.1)
        start = time.monotonic()
    digest = hashlib.blake2b(digest_size=16)
    sent = retries = total = reopens = 0

    def report() -> None:
        secs = time.monotonic() - start
        print(f"publisher: sent={sent} channel={channel} bytes={total} seconds={secs:.3f} "
              f"rate={sent / secs if secs else 0:.0f}/s digest={digest.hexdigest()} "
              f"retries={retries} reopens={reopens}", flush=True)

    next_report, next_check = time.monotonic() + report_every, 0.0
    while True:  # one pass per daemon; only the for-ever mode makes a second pass
        try:
            instance = daemon_instance()
            with shimmy.Channel(channel, mode=mode) as ch:
                print(f"publisher: ready channel={channel} mode={mode} count={count} "
                      f"size={size} pid={os.getpid()}", flush=True)
                while forever or sent < count:
                    data = payload(seed, sent, size)
                    try:
                        ch.publish(data)
                    except shimmy.BackpressureTimeout as exc:
                        # a reliable ring is full of frames a live (or not yet reclaimed dead)
                        # subscriber has not read: wait and go on, within the overall limit
                        retries += 1
                        if forever and daemon_instance() != instance:
                            raise DaemonReplaced("the daemon's socket was replaced") from None
                        if not forever and time.monotonic() > deadline:
                            print(f"publisher: giving up after {limit}s: {exc}", flush=True)
                            break
                        continue
                    digest.update(data)
                    total += len(data)
                    sent += 1
                    if rate > 0:
                        delay = start + sent / rate - time.monotonic()
                        if delay > 0:
                            time.sleep(delay)
                    if forever:
                        now = time.monotonic()
                        if now >= next_check:  # one stat() a second, not one per message
                            next_check = now + 1.0
                            if daemon_instance() != instance:
                                raise DaemonReplaced("the daemon's socket was replaced")
                        if now >= next_report:
                            next_report = now + report_every
                            report()
                    elif time.monotonic() > deadline:
                        print(f"publisher: overall limit {limit}s reached", flush=True)
                        break
        except (shimmy.ShimmyError, DaemonReplaced) as exc:
            print(f"publisher: error {type(exc).__name__}: {exc}", flush=True)
            if not forever:
                break
            reopens += 1
            time.sleep(1.0)  # the daemon is being replaced: reopen once it answers again
            continue
        break
    report()
    return 0 if sent == count else 1


if __name__ == "__main__":
    sys.exit(main())
