"""Worker processes for the tests: each runs as its own interpreter (``python tests/workers.py``).

Payloads are deterministic functions of the message's sequence number, so a subscriber checks
every byte it receives without the publisher sending it anything else:
``payload(seq, max_size)`` gives the size and the bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
import zlib

import shimmy


def until(cond, timeout: float, what, every: float = 0.05):
    """cond()'s first truthy value, polled every ``every`` seconds; AssertionError naming
    ``what`` (a text, or a callable giving it at the failure: a log's tail) after ``timeout``
    seconds (a bound on a wait, never a speed figure).  The tests' one polling loop: a wait
    written out again in a test is a second copy of this."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"not within {timeout} s: {what() if callable(what) else what}")


def payload(seq: int, max_size: int) -> bytes:
    rng = random.Random(seq)
    size = rng.randint(0, max_size) if seq % 7 else rng.choice((0, max_size))
    return rng.randbytes(size)


def publish(args) -> dict:
    ch = shimmy.Channel(args.channel, daemon=args.daemon, mode=args.mode, capacity=args.capacity)
    if args.ready:
        open(args.ready, "w").close()
    pauses = 0
    if args.batch:
        # publish_many in batches of 1..batch messages (sizes vary, so batches cross the wrap
        # point and, on a reliable channel with a slow subscriber, wait for room mid-batch).
        rng = random.Random(args.count)
        i = 0
        while i < args.count:
            k = min(rng.randint(1, args.batch), args.count - i)
            n = ch.publish_many((payload(j, args.max_size) for j in range(i, i + k)),
                                timeout=args.timeout)
            if n != k or ch._writer._seq != i + k + args.first_seq:
                raise SystemExit(f"publish_many returned {n} of {k}, next seq "
                                 f"{ch._writer._seq}, expected {i + k + args.first_seq}")
            i += k
        ch.close()
        return {"published": args.count}
    for i in range(args.count):
        data = payload(i, args.max_size)
        if args.loan:
            with ch.loan(len(data), timeout=args.timeout) as buf:
                buf[:] = data
            seq = ch._writer._seq - 1
        else:
            seq = ch.publish(data, timeout=args.timeout)
        if seq != i + args.first_seq:
            raise SystemExit(f"publish returned seq {seq}, expected {i + args.first_seq}")
        if args.rate and i % 100 == 99:
            time.sleep(100 / args.rate)
            pauses += 1
    ch.close()
    return {"published": args.count}


def subscribe(args) -> dict:
    ch = shimmy.Channel(args.channel, daemon=args.daemon, mode=args.mode, capacity=args.capacity)
    sub = ch.subscribe(start=args.start)
    if args.ready:
        open(args.ready, "w").close()
    received = lost = bad = 0
    last_seq = None
    crc = 0
    try:
        while True:
            if args.batch:
                lost_before = sub.lost
                try:
                    batch = sub.receive_many(args.batch, timeout=args.idle)
                except TimeoutError:
                    break
                # Within a batch the sequence numbers are consecutive except where messages
                # were lost; the batch's last is last_seq, so its first follows from the count.
                batch_lost = sub.lost - lost_before
                seq = sub.last_seq - len(batch) - batch_lost + 1
                if last_seq is not None and seq != last_seq + 1:
                    bad += 1
                # Each message is the payload of the next sequence number, or of a later one
                # within the batch's losses (where they fell inside the batch is not told).
                skips = batch_lost
                for data in batch:
                    while data != payload(seq, args.max_size) and skips:
                        seq, skips = seq + 1, skips - 1
                    if data != payload(seq, args.max_size):
                        bad += 1
                    seq += 1
                    crc = zlib.crc32(data, crc)
                if seq + skips != sub.last_seq + 1:
                    bad += 1
                last_seq, lost, received = sub.last_seq, lost + batch_lost, received + len(batch)
                if args.slow and received // 50 != (received - len(batch)) // 50:
                    time.sleep(args.slow)
                if args.count and received + lost >= args.count:
                    break
                continue
            if args.copy_path:
                lost_before = sub.lost
                try:
                    data = sub.receive_bytes(timeout=args.idle)
                except TimeoutError:
                    break
                seq, msg_lost = sub.last_seq, sub.lost - lost_before
                if data != payload(seq, args.max_size) or (
                        last_seq is not None and seq != last_seq + 1 + msg_lost):
                    bad += 1
                last_seq, lost, received = seq, lost + msg_lost, received + 1
                crc = zlib.crc32(data, crc)
                if args.count and received + lost >= args.count:
                    break
                continue
            try:
                msg = sub.receive(timeout=args.idle)
            except TimeoutError:
                break
            if args.stall and received == 0:
                time.sleep(args.stall)
            try:
                data = bytes(msg)
            except shimmy.MessageOverwritten:
                # Lossy mode: lapped while copying; counted as lost, never returned torn.
                last_seq = msg.seq
                lost += 1 + msg.lost
                continue
            if data != payload(msg.seq, args.max_size):
                bad += 1
            if last_seq is not None and msg.seq != last_seq + 1 + msg.lost:
                bad += 1
            last_seq = msg.seq
            lost += msg.lost
            received += 1
            crc = zlib.crc32(data, crc)
            if args.slow and received % 50 == 0:
                time.sleep(args.slow)
            if args.count and received + lost >= args.count:
                break
    except shimmy.ChannelClosed as exc:
        return {"received": received, "lost": lost, "bad": bad, "last_seq": last_seq,
                "closed": str(exc)}
    sub.close()
    ch.close()
    return {"received": received, "lost": lost, "bad": bad, "last_seq": last_seq, "crc": crc}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("role", choices=["publish", "subscribe"])
    p.add_argument("--daemon", required=True)
    p.add_argument("--channel", required=True)
    p.add_argument("--mode")
    p.add_argument("--capacity", type=int)
    p.add_argument("--count", type=int, default=0)
    p.add_argument("--max-size", type=int, default=1024)
    p.add_argument("--first-seq", type=int, default=0)
    p.add_argument("--start", default="next")
    p.add_argument("--idle", type=float, default=5.0, help="stop after this long without data")
    p.add_argument("--timeout", type=float, default=30.0)
    p.add_argument("--ready", help="touch this file once attached")
    p.add_argument("--slow", type=float, default=0.0, help="sleep this long every 50 messages")
    p.add_argument("--stall", type=float, default=0.0, help="sleep this long after the first")
    p.add_argument("--rate", type=float, default=0.0, help="publish about this many per second")
    p.add_argument("--loan", action="store_true")
    p.add_argument("--copy-path", action="store_true", help="receive with receive_bytes()")
    p.add_argument("--batch", type=int, default=0,
                   help="publish_many / receive_many with batches of up to this many")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    result = publish(args) if args.role == "publish" else subscribe(args)
    result["pid"] = os.getpid()
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
