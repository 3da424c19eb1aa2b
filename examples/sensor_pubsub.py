"""Pub/sub in two processes: a sensor publishes readings, a dashboard subscribes.

    shimmy daemon --socket /tmp/shimmy.sock &          # once per node
    SHIMMY_DAEMON=/tmp/shimmy.sock python examples/sensor_pubsub.py

The subscriber runs in a child process of its own; both ends use only the public SDK.
"""

from __future__ import annotations

import multiprocessing as mp
import struct
import time

import shimmy

READING = struct.Struct("<dd")   # timestamp, temperature
COUNT = 1000


def dashboard(ready) -> None:
    with shimmy.Channel("sensors/temp") as ch, ch.subscribe() as sub:
        ready.set()
        total = 0.0
        for _ in range(COUNT):
            msg = sub.receive(timeout=10)
            stamp, temp = READING.unpack(msg.data)        # straight from shared memory
            total += temp
            if msg.lost:
                print(f"missed {msg.lost} readings")
        print(f"dashboard: {COUNT} readings, mean {total / COUNT:.2f} C, last seq {msg.seq}")


def main() -> None:
    ready = mp.get_context("spawn").Event()
    child = mp.get_context("spawn").Process(target=dashboard, args=(ready,))
    child.start()
    ready.wait(30)
    with shimmy.Channel("sensors/temp") as ch:
        for i in range(COUNT):
            ch.publish(READING.pack(time.time(), 20.0 + (i % 10) / 10))
    child.join(30)
    raise SystemExit(child.exitcode)


if __name__ == "__main__":
    main()
