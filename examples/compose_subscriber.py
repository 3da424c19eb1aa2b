"""Receive N checksummed messages from a shimmy channel, check each, print one summary line.

The counterpart of examples/compose_publisher.py (same environment variables: SHIMMY_CHANNEL,
SHIMMY_COUNT, SHIMMY_SEED, SHIMMY_TIMEOUT, SHIMMY_MODE) plus:
  SHIMMY_READY_FILE  a file created once subscribed (default /tmp/shimmy-subscribed), so a
                     health check (compose) can hold the publisher back until then
  SHIMMY_RECEIVE_TIMEOUT  seconds to wait for one message before giving up (default 60)
  SHIMMY_REPORT_EVERY  with SHIMMY_COUNT=0: seconds between summary lines (default 10)

SHIMMY_COUNT=0 receives for ever (a long-running workload such as the Kubernetes example): no
message timeout ends it, and when the node's daemon is replaced (a rolling update) it reopens
the channel and goes on; the summary line then also says ``reopens=K``.

Every message is checked: its checksum, its index (in order, none missing), and its bytes
against the payload the publisher derives from the seed.  Summary line:
``subscriber: received=N expected=N bad=B lost=L out_of_order=O channel=C seconds=S rate=R/s
digest=HEX``.  Exit status 0 only when all N arrived intact and in order.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time

import shimmy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compose_publisher import (  # noqa: E402  (same folder)
    CHECK, HEADER, DaemonReplaced, channel_and_count, daemon_instance, payload)


def main() -> int:
    channel, count = channel_and_count("subscriber")
    forever = count == 0
    limit = float(os.environ.get("SHIMMY_TIMEOUT", "300"))
    per_message = float(os.environ.get("SHIMMY_RECEIVE_TIMEOUT", "60"))
    report_every = float(os.environ.get("SHIMMY_REPORT_EVERY", "10"))
    seed = os.environ.get("SHIMMY_SEED", "shimmy").encode()
    ready_file = os.environ.get("SHIMMY_READY_FILE", "/tmp/shimmy-subscribed")

    digest = hashlib.blake2b(digest_size=16)
    received = bad = lost = out_of_order = reopens = 0
    expected_index: int | None = 0
    start = time.monotonic()
    deadline = start + limit

    def report() -> None:
        secs = time.monotonic() - start
        print(f"subscriber: received={received} expected={count} bad={bad} lost={lost} "
              f"out_of_order={out_of_order} channel={channel} seconds={secs:.3f} "
              f"rate={received / secs if secs else 0:.0f}/s digest={digest.hexdigest()}"
              + (f" reopens={reopens}" if forever else ""), flush=True)

    next_report = start + report_every
    while True:  # one pass per daemon; only the for-ever mode makes a second pass
        try:
            mode = os.environ.get("SHIMMY_MODE") or None  # None: the channel's existing mode
            instance = daemon_instance()
            with shimmy.Channel(channel, mode=mode) as ch, ch.subscribe() as sub:
                if ready_file:
                    with open(ready_file, "w") as f:
                        f.write(str(os.getpid()))
                print(f"subscriber: ready channel={channel} count={count} pid={os.getpid()}",
                      flush=True)
                while forever or received < count:
                    if forever:
                        now = time.monotonic()
                        if now >= next_report:
                            next_report = now + report_every
                            report()
                        wait = 1.0  # check the daemon once a second while idle
                    else:
                        wait = min(per_message, deadline - time.monotonic())
                        if wait <= 0:
                            print(f"subscriber: overall limit {limit}s reached", flush=True)
                            break
                    try:
                        msg = sub.receive(timeout=wait)
                    except shimmy.ReceiveTimeout as exc:
                        if not forever:
                            print(f"subscriber: {exc}", flush=True)
                            break
                        if daemon_instance() != instance:
                            raise DaemonReplaced("the daemon's socket was replaced") from None
                        continue
                    data = bytes(msg)
                    lost += msg.lost
                    msg.release()
                    received += 1
                    ok = len(data) >= HEADER.size + CHECK and hashlib.blake2b(
                        data[:-CHECK], digest_size=CHECK).digest() == data[-CHECK:]
                    if not ok:
                        bad += 1
                        continue
                    index, _ = HEADER.unpack_from(data)
                    if expected_index is not None and index != expected_index:
                        out_of_order += 1
                    if data != payload(seed, index, len(data)):
                        bad += 1
                    expected_index = index + 1
                    digest.update(data)
        except (shimmy.ShimmyError, DaemonReplaced) as exc:
            print(f"subscriber: error {type(exc).__name__}: {exc}", flush=True)
            if not forever:
                break
            # messages published while no daemon served are gone: start counting order afresh
            reopens += 1
            expected_index = None
            time.sleep(1.0)
            continue
        break
    report()
    return 0 if (received == count and bad == 0 and lost == 0 and out_of_order == 0) else 1


if __name__ == "__main__":
    sys.exit(main())
