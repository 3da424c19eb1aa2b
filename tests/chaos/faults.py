"""Fault injection for the crash tests: a publisher process that SIGKILLs itself at an exact
store of the commit protocol (not a random point).

``KillAtStore`` wraps the publisher's u64 view of the control page: the ``skip + 1``-th store to
``word`` kills the process *before* the store happens.  It replaces ``RingWriter._q`` in the
child only; the library itself has no hook (nothing on the hot path).  Stores made in C
(shimmy/_ringcore.c) cannot be intercepted this way, so the child runs the Python versions of
the fast paths (``SHIMMY_PURE_PYTHON=1``, set by ``child_env()``), which make the same stores in
the same order; the C paths are killed at random instants by the crash matrix instead
(tests/chaos/crash.py).

    python -m tests.chaos.faults --daemon SOCK --channel NAME --mode reliable \
        --count 10 --size 100 --kill-word tail --skip 0 --last-size 2000
publishes ``count`` messages (tests.chaos.payloads), arms the fault, then publishes one more
of ``last-size`` bytes: the process dies before its ``skip``-th store to that word.
"""

from __future__ import annotations

import argparse
import os
import signal

import shimmy
from shimmy import ring

from . import payloads

WORDS = {"tail": ring.W_TAIL, "last": ring.W_LAST, "head": ring.W_HEAD}


def child_env() -> dict:
    """The environment to run this module in: the Python fast paths, whose stores go through
    ``RingWriter._q`` (see the module docstring)."""
    return {**os.environ, "SHIMMY_PURE_PYTHON": "1"}


class KillAtStore:
    """Fault-injection proxy for a memoryview of u64 words (see the module docstring)."""

    def __init__(self, q, word: int, skip: int):
        self.q, self.word, self.skip = q, word, skip

    def __getitem__(self, i):
        return self.q[i]

    def __setitem__(self, i, value) -> None:
        if i == self.word:
            if self.skip == 0:
                os.kill(os.getpid(), signal.SIGKILL)
            self.skip -= 1
        self.q[i] = value


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--daemon", required=True)
    p.add_argument("--channel", required=True)
    p.add_argument("--mode", default="reliable")
    p.add_argument("--capacity", type=int, default=4096)
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--size", type=int, default=100)
    p.add_argument("--kill-word", choices=sorted(WORDS), default="tail")
    p.add_argument("--skip", type=int, default=0)
    p.add_argument("--last-size", type=int, default=100)
    p.add_argument("--loan", action="store_true", help="publish the fatal message with loan()")
    p.add_argument("--rewind", action="store_true", help="the publisher chooses rewind=True")
    p.add_argument("--max-publishers", type=int, default=None,
                   help="open the channel as a publisher group (its member ring is faulted)")
    args = p.parse_args()
    if ring.ACCELERATED:
        raise SystemExit("the C fast paths are loaded: their stores cannot be intercepted "
                         "(run with SHIMMY_PURE_PYTHON=1, faults.child_env())")
    ch = shimmy.Channel(args.channel, daemon=args.daemon, mode=args.mode,
                        capacity=args.capacity, max_publishers=args.max_publishers,
                        rewind=args.rewind)
    first = None
    for i in range(args.count):
        seq = ch.publish(payloads.make(i, args.size, size=args.size))
        first = seq if first is None else first
    writer = ch._writer
    assert writer is not None
    writer._q = KillAtStore(writer._q, WORDS[args.kill_word], args.skip)
    data = payloads.make(args.count, args.last_size, size=args.last_size)
    if args.loan:
        with ch.loan(len(data)) as buf:
            buf[:] = data
    else:
        ch.publish(data)
    raise SystemExit("the fault did not fire")


if __name__ == "__main__":
    main()
