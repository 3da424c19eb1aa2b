"""Write the conformance vectors (spec/vectors/README.md) from the real ring code.

    python spec/vectors/generate.py [--out DIR]      (default: this directory)

Every image is made by the code the SDK and the daemon run (``shimmy.ring``, ``shimmy.stream_ring``:
``format_ring``, ``daemon_activate_slot``, ``RingWriter``, ``WriterCursor``...); the few states no
single call leaves behind (a writer stopped between two stores of a commit) are made by the same
calls, stopped at that store, as the crash tests do (``tests/chaos/faults.py``).  Corrupted cases
store the bad word over a good image.  Everything that varies between runs is fixed: the creation
time, pids, payloads.  ``tests/test_conformance.py`` checks that this script writes exactly the
committed files (the frozen-vector rule).
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import struct
import sys
import tempfile
from typing import Any, Callable

import msgpack

from shimmy import ring, stream_ring
from shimmy.conform import NO_SEMAPHORE_PREFIX, encode_frame
from shimmy.errors import ShimmyError

HERE = os.path.dirname(os.path.abspath(__file__))
CREATED_NS = 1_800_000_000_000_000_000   # fixed creation time (2027-01-15)
PID = 4242                               # fixed subscriber pid
CAPACITY = 4096
MAX_SUBS = 4
REQUEST_MAX_BYTES = 65536                # the daemon's default request_max_bytes
WAITS = [ring.OFF_WAITS, 8]              # informational counter, ignored in image comparisons


def payload(i: int, n: int) -> bytes:
    """Message ``i`` of ``n`` bytes: the same rule as shimmy-c's (spec/vectors/README.md)."""
    head = i.to_bytes(8, "little")[:n]
    return head + bytes((i + k) % 251 for k in range(len(head), n))


class Stop(Exception):
    """Raised by StopAtStore instead of the store it stops at."""


class StopAtStore:
    """A u64 view that lets ``allowed`` stores to the publisher's words through, then raises
    before the next one (the writer 'dies' there, leaving the ring as it is)."""

    def __init__(self, q: memoryview, allowed: int):
        self.q, self.allowed = q, allowed

    def __getitem__(self, i: int) -> int:
        return self.q[i]

    def __setitem__(self, i: int, value: int) -> None:
        if i in (ring.W_TAIL, ring.W_LAST, ring.W_HEAD):
            if self.allowed == 0:
                raise Stop
            self.allowed -= 1
        self.q[i] = value


class Image:
    """A ring or stream image in a temporary file, mapped as a client maps /dev/shm."""

    def __init__(self, size: int):
        self.f = tempfile.TemporaryFile()
        self.f.truncate(size)
        self.mm = mmap.mmap(self.f.fileno(), size)

    def bytes(self) -> bytes:
        return bytes(self.mm)

    def close(self) -> None:
        self.mm.close()
        self.f.close()


def new_ring(name: str, mode: int = ring.MODE_RELIABLE, capacity: int = CAPACITY,
             subscribers: list[int] = ()) -> tuple[Image, ring.RingView]:
    img = Image(ring.segment_size(capacity, MAX_SUBS))
    ring.format_ring(img.mm, name, mode, capacity, MAX_SUBS)
    struct.pack_into("<Q", img.mm, ring.OFF_CREATED, CREATED_NS)
    view = ring.RingView(img.mm)
    for slot in subscribers:
        ring.daemon_activate_slot(view, slot, 0, PID, 1)
    return img, view


def writer(view: ring.RingView) -> ring.RingWriter:
    return ring.RingWriter(view, ring.Wakeups(view, NO_SEMAPHORE_PREFIX))


def stopped(view: ring.RingView, allowed: int, call: Callable[[ring.RingWriter], Any]) -> None:
    """Run ``call`` on a fresh writer's Python path, stopped before its ``allowed + 1``-th store
    to tail/last/head."""
    w = writer(view)
    w._q = StopAtStore(view.q, allowed)
    try:
        call(w)
    except Stop:
        pass
    else:
        raise AssertionError("the writer made fewer stores than the state needs")


def release(view: ring.RingView) -> None:
    view.release()


# -- the cases -------------------------------------------------------------------------------
class Suite:
    def __init__(self, out: str, fmt: str, version: int):
        self.dir = os.path.join(out, fmt, f"v{version}")
        self.doc: dict[str, Any] = {"format": fmt, "version": version, "cases": []}
        self.files: dict[str, bytes] = {}

    def image(self, name: str, data: bytes) -> str:
        self.files[name] = data
        return name

    def case(self, **case: Any) -> None:
        self.doc["cases"].append(case)

    def write(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        for name, data in self.files.items():
            with open(os.path.join(self.dir, name), "wb") as f:
                f.write(data)
        with open(os.path.join(self.dir, "cases.json"), "w") as f:
            json.dump(self.doc, f, indent=1)
            f.write("\n")


def msg(seq: int, data: bytes) -> dict[str, Any]:
    return {"seq": seq, "data": data.hex()}


EMPTY = {"end": "empty"}
BAD = {"error": "ring_corrupted"}


def after_write(img: Image, view: ring.RingView, ops: list[dict[str, Any]]) -> tuple[bytes, list]:
    """Apply ``ops`` as conform-write does to a copy of the image: the expected image and
    lines."""
    copy = Image(len(img.mm))
    copy.mm[:] = img.mm
    cview = ring.RingView(copy.mm)
    lines: list[dict[str, Any]] = []
    try:
        w = writer(cview)
    except ring.RingCorrupted as exc:
        release(cview)
        copy.close()
        return img.bytes(), [{"error": exc.code}]
    lines.append({"next_seq": w.next_seq})
    for op in ops:
        try:
            if op["op"] == "publish":
                lines.append({"seq": w.publish(bytes.fromhex(op["data"]), op.get("timeout"))})
            elif op["op"] == "publish_many":
                n = w.publish_many([bytes.fromhex(d) for d in op["items"]], op.get("timeout"))
                lines.append({"published": n})
            else:
                data = bytes.fromhex(op["data"])
                v = w.claim(op["size"], op.get("timeout"))
                v[:len(data)] = data
                v.release()
                lines.append({"seq": w.commit_claim(op["size"])})
        except ShimmyError as exc:
            line = {"error": exc.code}
            if op["op"] == "publish_many":
                line["published"] = exc.published
            lines.append(line)
    out = copy.bytes()
    release(cview)
    copy.close()
    return out, lines


def ring_suite(out: str) -> Suite:
    s = Suite(out, "ring", ring.LAYOUT_VERSION)

    def add(name: str, about: str, img: Image, view: ring.RingView, *, reads=(), points=(),
            ops: list | None = None, ignore=()) -> None:
        case: dict[str, Any] = {"name": name, "about": about,
                                "image": s.image(f"{name}.img", img.bytes())}
        if reads:
            case["read"] = [{"start": f"{p}:{q}", "slot": slot, "expect": exp}
                            for (p, q, slot, exp) in reads]
        if points:
            case["point"] = [{"oldest": o, "expect": e} for (o, e) in points]
        if ops is not None:
            after, lines = after_write(img, view, ops)
            case["write"] = {"ops": ops, "expect": lines,
                             "image": s.image(f"{name}.after.img", after),
                             "ignore": [WAITS, *ignore]}
        s.case(**case)
        release(view)
        img.close()

    three = [payload(0, 0), payload(1, 5), payload(2, 40)]
    pub3 = [{"op": "publish", "data": payload(10, 24).hex()},
            {"op": "publish_many", "items": [payload(11, 8).hex(), payload(12, 100).hex()]},
            {"op": "loan", "size": 16, "data": payload(13, 16).hex()}]

    img, v = new_ring("vec/empty")
    add("empty", "a fresh ring: nothing to read, start point 0:0", img, v,
        reads=[(0, 0, 0, [EMPTY])], points=[(False, {"position": 0, "seq": 0}),
                                           (True, {"position": 0, "seq": 0})], ops=pub3)

    img, v = new_ring("vec/three", subscribers=[0])
    w = writer(v)
    for d in three:
        w.publish(d, None)
    tail = v.q[ring.W_TAIL]
    add("three", "three messages (0, 5 and 40 bytes), a subscriber at 0", img, v,
        reads=[(0, 0, 0, [msg(i, d) for i, d in enumerate(three)] + [EMPTY]),
               (tail, 3, 1, [EMPTY])],
        points=[(False, {"position": tail, "seq": 3}), (True, {"position": 0, "seq": 0})],
        ops=pub3)

    # Wrapped: no subscriber, so the head moves on; messages of 200 bytes until past the wrap.
    img, v = new_ring("vec/wrapped")
    w = writer(v)
    sent = [payload(i, 200 + i) for i in range(24)]
    for d in sent:
        w.publish(d, None)
    head, tail = v.q[ring.W_HEAD], v.q[ring.W_TAIL]
    first, readable = _readable(v, sent)
    add("wrapped", "24 messages of 200+ bytes through a 4 KiB ring: PADs committed alone at "
        "each wrap, the head past the oldest frames", img, v,
        reads=[(head, first, 0, [msg(first + i, d) for i, d in enumerate(readable)] + [EMPTY])],
        points=[(False, {"position": tail, "seq": 24}), (True, {"position": head, "seq": first})],
        ops=[{"op": "publish", "data": payload(30, 1500).hex()},
             {"op": "publish_many", "items": [payload(31 + i, 700).hex() for i in range(4)]}])

    # A PAD at the tail: the writer committed the PAD alone and stopped before its frame.
    img, v = new_ring("vec/pad-at-tail")
    w = writer(v)
    sent = [payload(i, 1000) for i in range(3)]
    for d in sent:
        w.publish(d, None)
    w._reserve(1000, None)      # commits the PAD to the end of the ring, writes no frame
    tail = v.q[ring.W_TAIL]
    add("pad-at-tail", "three messages, then a PAD committed alone up to the wrap point (the "
        "writer stopped before its next frame)", img, v,
        reads=[(0, 0, 0, [msg(i, d) for i, d in enumerate(sent)] + [EMPTY])],
        points=[(False, {"position": tail, "seq": 3}), (True, {"position": 0, "seq": 0})],
        ops=[{"op": "publish", "data": payload(3, 1000).hex()}])

    # Lossy and lapped: a subscriber left at 0 while the publisher went round twice.
    img, v = new_ring("vec/lossy-lapped", mode=ring.MODE_LOSSY, subscribers=[0])
    w = writer(v)
    sent = [payload(i, 300) for i in range(30)]
    for d in sent:
        w.publish(d, None)
    first, readable = _readable(v, sent)
    add("lossy-lapped", "lossy: a subscriber still at position 0 after 30 messages of 300 bytes "
        "went through a 4 KiB ring: it jumps to the head and counts exactly what it lost",
        img, v,
        reads=[(0, 0, 0, [{"lost": first}] + [msg(first + i, d) for i, d in enumerate(readable)]
                + [EMPTY])],
        points=[(True, {"position": v.q[ring.W_HEAD], "seq": first})],
        ops=[{"op": "publish", "data": payload(30, 300).hex()}])

    # A gap in the numbers (a carried stream: RingWriter.skip_to).
    img, v = new_ring("vec/seq-gap")
    w = writer(v)
    w.publish(payload(0, 10), None)
    w.publish(payload(1, 10), None)
    w.skip_to(10)
    w.publish(payload(10, 10), None)
    w.publish(payload(11, 10), None)
    add("seq-gap", "messages 0, 1, then 10, 11 (numbers skipped by a carried stream): 8 lost",
        img, v,
        reads=[(0, 0, 0, [msg(0, payload(0, 10)), msg(1, payload(1, 10)), {"lost": 8},
                          msg(10, payload(10, 10)), msg(11, payload(11, 10)), EMPTY])],
        points=[(False, {"position": v.q[ring.W_TAIL], "seq": 12})])

    # Every intermediate state of a batch commit, after two committed messages.
    batch = [payload(2, 30), payload(3, 60), payload(4, 90)]
    states = ["frames written, nothing stored", "last = old tail (== tail)",
              "tail = end, last = the batch's first frame", "last = the final frame"]
    for k, about in enumerate(states):
        img, v = new_ring(f"vec/batch-{k}")
        w = writer(v)
        w.publish(payload(0, 20), None)
        w.publish(payload(1, 20), None)
        before = v.q[ring.W_TAIL]
        if k < 3:
            stopped(v, k, lambda w: ring.RingWriter._publish_many_py(w, batch, None))
        else:
            writer(v).publish_many(batch, None)
        old = [msg(0, payload(0, 20)), msg(1, payload(1, 20))]
        committed = k >= 2
        tail = v.q[ring.W_TAIL]
        seen = old + ([msg(2 + i, d) for i, d in enumerate(batch)] if committed else [])
        add(f"batch-{k}", f"a batch of three after two messages, stopped after {k} of its 3 "
            f"commit stores: {about}", img, v,
            reads=[(0, 0, 0, seen + [EMPTY]), (before, 2, 1, seen[2:] + [EMPTY])],
            points=[(False, {"position": tail, "seq": 5 if committed else 2}),
                    (True, {"position": 0, "seq": 0})],
            ops=[{"op": "publish", "data": payload(5, 10).hex()}])

    # A single publish stopped between its two stores: last == tail (roll forward).
    for k, about in enumerate(["frame written, nothing stored",
                               "last = the frame, tail not yet (last == tail)"]):
        img, v = new_ring(f"vec/publish-{k}")
        w = writer(v)
        w.publish(payload(0, 20), None)
        stopped(v, k, lambda w: ring.RingWriter._publish_py(w, payload(1, 50), None))
        tail = v.q[ring.W_TAIL]
        add(f"publish-{k}", f"one message, then a publish stopped after {k} of its 2 stores: "
            f"{about}; a new publisher {'rolls the commit forward' if k else 'overwrites it'}",
            img, v,
            reads=[(0, 0, 0, [msg(0, payload(0, 20)), EMPTY])],
            points=[(False, {"position": tail, "seq": 1})],
            ops=[{"op": "publish", "data": payload(2, 10).hex()}])

    # Reliable and full: the subscriber at 0 holds the room.
    img, v = new_ring("vec/reliable-full", subscribers=[0])
    w = writer(v)
    sent = [payload(i, 1000) for i in range(3)]
    for d in sent:
        w.publish(d, None)
    add("reliable-full", "reliable: three 1000-byte messages and a subscriber at 0; a fourth "
        "needs room the subscriber holds: refused after its timeout (0 s)", img, v,
        reads=[(0, 0, 0, [msg(i, d) for i, d in enumerate(sent)] + [EMPTY])],
        ops=[{"op": "publish", "data": payload(3, 1000).hex(), "timeout": 0},
             {"op": "publish", "data": payload(3, 8).hex(), "timeout": 0},
             {"op": "publish_many", "items": [payload(4, 8).hex(), payload(5, 1000).hex()],
              "timeout": 0},
             {"op": "publish", "data": payload(6, 2033).hex(), "timeout": 0}])

    # Retired by the daemon: a publish is refused, readers still read what is there.
    img, v = new_ring("vec/retired")
    w = writer(v)
    w.publish(payload(0, 10), None)
    v.q[ring.W_RETIRED] = 1
    add("retired", "one message, then the daemon retired the ring: publishing is refused "
        "(retired), reading what is committed is not", img, v,
        reads=[(0, 0, 0, [msg(0, payload(0, 10)), EMPTY])],
        ops=[{"op": "publish", "data": payload(1, 10).hex()},
             {"op": "publish_many", "items": [payload(1, 10).hex()]},
             {"op": "loan", "size": 10, "data": payload(1, 10).hex()}])

    # Corrupted: one word or header stored over a good image of three messages.
    def corrupt(name: str, about: str, damage: Callable[[ring.RingView, list[int]], None],
                good: int, point: dict[str, Any] | None, mode: int = ring.MODE_RELIABLE,
                ends: dict[str, Any] | None = None) -> None:
        img, v = new_ring(f"vec/{name}", mode=mode)
        w = writer(v)
        starts = []
        for d in three:
            starts.append(v.q[ring.W_TAIL])
            w.publish(d, None)
        damage(v, starts)
        add(name, about, img, v,
            reads=[(0, 0, 0, [msg(i, three[i]) for i in range(good)] + [ends or BAD])],
            points=[(False, point or BAD)])

    def header(v: ring.RingView, pos: int, length: int, flags: int, seq: int) -> None:
        struct.pack_into("<IIQ", v.mm, v.data_offset + pos, length, flags, seq)

    end3 = {"position": 112, "seq": 3}   # the tail after the three messages (16 + 32 + 64)
    corrupt("bad-flags", "frame 1's flags are 2 (neither message nor PAD)",
            lambda v, st: header(v, st[1], 5, 2, 1), 1, end3)
    corrupt("too-long", "frame 1's length is past the largest message (capacity/2 - 16)",
            lambda v, st: header(v, st[1], 2033, 0, 1), 1, end3)
    corrupt("past-tail", "frame 2's length makes it end past the tail",
            lambda v, st: header(v, st[2], 200, 0, 2), 2, None)
    corrupt("seq-backwards", "frame 2's seq is 0, behind the expected 2",
            lambda v, st: header(v, st[2], 40, 0, 0), 2, {"position": 112, "seq": 1})
    corrupt("seq-jump", "frame 2's seq jumps by more than 2^40 (garbage, not loss)",
            lambda v, st: header(v, st[2], 40, 0, 2 + (1 << 41)), 2,
            {"position": 112, "seq": 3 + (1 << 41)})
    corrupt("tail-unaligned", "tail is not a multiple of 16",
            lambda v, st: v.q.__setitem__(ring.W_TAIL, v.q[ring.W_TAIL] + 8), 0, None)
    corrupt("head-past-tail", "lossy: head is past the tail (a reader at 0 resyncs to it)",
            lambda v, st: v.q.__setitem__(ring.W_HEAD, v.q[ring.W_TAIL] + 16), 0, None,
            mode=ring.MODE_LOSSY)
    corrupt("last-past-tail", "last is past the tail (head <= last <= tail is broken): readers "
            "do not load last, the start point refuses",
            lambda v, st: v.q.__setitem__(ring.W_LAST, v.q[ring.W_TAIL] + 16), 3, None,
            ends=EMPTY)

    # Header refusals: magic, layout versions, size.
    for name, about, off, fmt, value, words in [
        ("bad-magic", "the magic is not SHMYRING", ring.OFF_MAGIC, "<Q", 0x1234, ["magic"]),
        ("version-newer", "layout version 3, newer than this format: refused, naming both",
         ring.OFF_VERSION, "<I", 3, ["3", str(ring.LAYOUT_VERSION)]),
        ("version-older", "layout version 1 (PADs committed with their frame): refused, "
         "naming both", ring.OFF_VERSION, "<I", 1, ["1", str(ring.LAYOUT_VERSION)]),
        ("bad-size", "the header's capacity does not match the segment's size",
         ring.OFF_CAPACITY, "<Q", 8192, []),
    ]:
        img, v = new_ring(f"vec/{name}")
        writer(v).publish(payload(0, 10), None)
        release(v)
        struct.pack_into(fmt, img.mm, off, value)
        err: dict[str, Any] = {"error": "ring_corrupted"}
        if words:
            err["message_contains"] = words
        s.files[f"{name}.img"] = img.bytes()
        s.case(name=name, about=about, image=f"{name}.img",
               read=[{"start": "0:0", "slot": 0, "expect": [err]}],
               point=[{"oldest": False, "expect": err}],
               write={"ops": [{"op": "publish", "data": payload(1, 10).hex()}],
                      "expect": [{"error": "ring_corrupted"}], "image": f"{name}.img",
                      "ignore": [WAITS]})
        img.close()
    return s


def _readable(v: ring.RingView, sent: list[bytes]) -> tuple[int, list[bytes]]:
    """The messages still intact from the head on: the first one's seq and the payloads."""
    head, tail = v.q[ring.W_HEAD], v.q[ring.W_TAIL]
    p, first = head, None
    while p < tail:
        length, flags, seq = ring.FRAME.unpack_from(v.mm, v.data_offset + (p & (v.capacity - 1)))
        if not flags:
            first = seq
            break
        p += length + ring.HEADER
    assert first is not None
    return first, sent[first:]


def group_suite(out: str) -> Suite:
    s = Suite(out, "group", ring.LAYOUT_VERSION)
    chan, cv = new_ring("vec/group", capacity=ring.MIN_CAPACITY, subscribers=[0, 1])
    cv.u32[ring.I_GROUP_EPOCH] = 2
    m1, v1 = new_ring("vec/group/.p1.node-a", subscribers=[0, 1])
    sent1 = [payload(100 + i, 64) for i in range(5)]
    w = writer(v1)
    for d in sent1:
        w.publish(d, None)
    m2, v2 = new_ring("vec/group/.p2.node-a", mode=ring.MODE_LOSSY, subscribers=[0, 1])
    sent2 = [payload(200 + i, 500) for i in range(12)]
    w = writer(v2)
    for d in sent2:
        w.publish(d, None)
    first, readable = _readable(v2, sent2)
    expect = ([{"group_epoch": 2}]
              + [{"publisher": 1, **msg(i, d)} for i, d in enumerate(sent1)]
              + [{"publisher": 2, "lost": first}]
              + [{"publisher": 2, **msg(first + i, d)} for i, d in enumerate(readable)]
              + [EMPTY])
    s.case(name="two-members", about="a lossy group's channel ring (group_epoch 2, slots 0 and 1)"
           " and two member rings: publisher 1 with 5 messages, publisher 2 lapped (lossy)",
           image=s.image("channel.img", chan.bytes()),
           members=[{"id": 1, "image": s.image("member-1.img", m1.bytes()), "start": "0:0"},
                    {"id": 2, "image": s.image("member-2.img", m2.bytes()), "start": "0:0"}],
           read=[{"slot": 1, "expect": expect}])
    for v, img in ((cv, chan), (v1, m1), (v2, m2)):
        release(v)
        img.close()
    return s


def stream_suite(out: str) -> Suite:
    s = Suite(out, "stream", stream_ring.LAYOUT_VERSION)

    class NoSem:
        def release(self) -> None:
            pass

    def new(name: str) -> tuple[Image, stream_ring.StreamView]:
        img = Image(stream_ring.segment_size(CAPACITY))
        stream_ring.format_stream(img.mm, name, CAPACITY)
        struct.pack_into("<Q", img.mm, stream_ring.OFF_CREATED, CREATED_NS)
        view = stream_ring.StreamView(img.mm)
        stream_ring.daemon_set_pid(view, "writer", PID)
        stream_ring.daemon_set_pid(view, "reader", PID + 1)
        return img, view

    def cursor(view):
        return stream_ring.WriterCursor(view, NoSem(), NoSem(), ring.fence, spin_us=0)

    def reader(view):
        return stream_ring.ReaderCursor(view, NoSem(), NoSem(), ring.fence, spin_us=0)

    def add(name, about, img, view, reads, ops=None, head=None):
        case: dict[str, Any] = {"name": name, "about": about,
                                "image": s.image(f"{name}.img", img.bytes())}
        case["read"] = [{"expect": reads, "head": head if head is not None
                         else view.q[stream_ring.OFF_TAIL // 8]}]
        if ops is not None:
            copy = Image(len(img.mm))
            copy.mm[:] = img.mm
            cview = stream_ring.StreamView(copy.mm)
            lines = []
            try:
                w = cursor(cview)
            except ring.RingCorrupted as exc:
                lines.append({"error": exc.code})
            else:
                for op in ops:
                    try:
                        if op["op"] == "write":
                            lines.append({"written": w.write_nowait(
                                memoryview(bytes.fromhex(op["data"])))})
                        else:
                            w.close()
                            lines.append({"closed": True})
                    except ShimmyError as exc:
                        lines.append({"error": exc.code})
            case["write"] = {"ops": ops, "expect": lines,
                             "image": s.image(f"{name}.after.img", copy.bytes()), "ignore": []}
            cview.release()
            copy.close()
        s.case(**case)
        view.release()
        img.close()

    text = bytes(range(256)) * 4
    ops = [{"op": "write", "data": text[:300].hex()}, {"op": "close"}]
    img, v = new("vec/s-empty")
    add("empty", "a fresh stream: nothing buffered, writer open", img, v, [{"end": "empty"}],
        ops=ops, head=0)
    img, v = new("vec/s-bytes")
    cursor(v).write_nowait(memoryview(text[:700]))
    add("bytes", "700 bytes buffered, writer open", img, v,
        [{"data": text[:700].hex()}, {"end": "empty"}],
        ops=[{"op": "write", "data": (text * 4)[:4000].hex()}])
    img, v = new("vec/s-wrapped")
    w, r = cursor(v), reader(v)
    w.write_nowait(memoryview((text * 4)[:3500]))
    r.read_bytes(3500, r.available())
    r._ro.release()   # the reader's read-only view of the mapping (it is not closed: no r_closed)
    w.write_nowait(memoryview(text[:1000]))
    add("wrapped", "3500 bytes written and read, then 1000 more crossing the end of the data "
        "area", img, v, [{"data": text[:1000].hex()}, {"end": "empty"}],
        ops=[{"op": "write", "data": (text * 4)[:3200].hex()}])
    img, v = new("vec/s-eof")
    w = cursor(v)
    w.write_nowait(memoryview(text[:100]))
    w.close()
    add("eof", "100 bytes, then a clean end of stream", img, v,
        [{"data": text[:100].hex()}, {"end": "eof"}])
    img, v = new("vec/s-writer-died")
    cursor(v).write_nowait(memoryview(text[:64]))
    stream_ring.daemon_mark_broken(v, "writer")
    add("writer-died", "64 bytes, then the writer died (the daemon set w_broken): the reader "
        "drains them, then the stream is broken", img, v,
        [{"data": text[:64].hex()}, {"error": "stream_broken"}])
    img, v = new("vec/s-reader-closed")
    cursor(v).write_nowait(memoryview(text[:64]))
    reader(v).close()
    add("reader-closed", "the reader closed its end: a write is refused", img, v,
        [{"data": text[:64].hex()}, {"end": "empty"}],
        ops=[{"op": "write", "data": text[:10].hex()}])
    img, v = new("vec/s-corrupted")
    cursor(v).write_nowait(memoryview(text[:64]))
    v.q[stream_ring.OFF_TAIL // 8] = CAPACITY + 128
    add("corrupted", "tail is more than the capacity ahead of head", img, v,
        [{"error": "ring_corrupted"}], ops=[{"op": "write", "data": "00"}], head=0)
    return s


# -- control protocol v2 -----------------------------------------------------------------------
def control_suite(out: str) -> Suite:
    s = Suite(out, "control", 2)
    INT, S, H, P, N, L, M = "<int>", "<str>", "<hex32>", "<path>", "<number>", "<list>", "<map>"
    tok = "0123456789abcdef0123456789abcdef"
    exchanges: list[tuple[str, dict, dict, dict]] = [
        # name, request, example reply (as a daemon sends it), reply shape
        ("ping", {"op": "ping"}, {"pid": 100, "uptime": 1.5, "protocol": 2},
         {"pid": INT, "uptime": N, "protocol": 2}),
        ("hello", {"op": "hello", "pid": 4242},
         {"client": 1, "token": tok, "session": "/run/shimmy/shimmyd.sock.session",
          "heartbeat_interval": 1.0, "lease_timeout": 5.0, "protocol": 2, "ring_format": 2},
         {"client": INT, "token": H, "session": P, "heartbeat_interval": N, "lease_timeout": N,
          "protocol": 2, "ring_format": 2}),
        ("open", {"op": "open", "client": 1, "token": tok, "name": "sensors/temp",
                  "mode": "reliable", "capacity": 4096, "create": True},
         {"shm": "/shimmy.0123abcd.4567ef01", "sem_prefix": "/shimmy.0123abcd.4567ef01.s",
          "mode": "reliable", "capacity": 4096, "max_message": 2032, "max_publishers": 1},
         {"shm": S, "sem_prefix": S, "mode": "reliable", "capacity": 4096, "max_message": 2032,
          "max_publishers": 1}),
        ("publish", {"op": "publish", "client": 1, "token": tok, "name": "sensors/temp",
                     "key": 1}, {}, {}),
        ("subscribe", {"op": "subscribe", "client": 1, "token": tok, "name": "sensors/temp",
                       "start": "next"},
         {"slot": 0, "position": 0, "seq": 0, "generation": 1},
         {"slot": INT, "position": INT, "seq": INT, "generation": INT}),
        ("members", {"op": "members", "client": 1, "token": tok, "name": "logs", "slot": 0},
         {"epoch": 1, "members": [{"id": 1, "shm": "/shimmy.0123abcd.89ab", "pid": 4242,
                                   "node": "node-a", "position": 0, "seq": 0}]},
         {"epoch": INT, "members": L}),
        ("unsubscribe", {"op": "unsubscribe", "client": 1, "token": tok, "name": "sensors/temp",
                         "slot": 0}, {}, {}),
        ("unpublish", {"op": "unpublish", "client": 1, "token": tok, "name": "sensors/temp",
                       "key": 1}, {}, {}),
        ("close", {"op": "close", "client": 1, "token": tok, "name": "sensors/temp", "key": 1},
         {}, {}),
        ("list", {"op": "list", "client": 1, "token": tok},
         {"channels": [], "hidden": 0}, {"channels": L, "hidden": INT}),
        ("stat", {"op": "stat", "client": 1, "token": tok},
         {"counters": {}, "settings": {}, "channels": [], "hidden_channels": 0},
         {"counters": M, "settings": M, "channels": L, "hidden_channels": INT}),
        ("delete", {"op": "delete", "client": 1, "token": tok, "name": "sensors/temp",
                    "kind": "channel"}, {}, {}),
    ]
    cases_requests = []
    replies = b""
    expect_replies = []
    for i, (name, req, rep, shape) in enumerate(exchanges, start=1):
        request = {"v": 2, "id": i, **req}
        reply = {"v": 2, "id": i, "ok": True, **rep}
        cases_requests.append(request)
        replies += encode_frame(reply)
        expect_replies.append({"reply": {"v": 2, "id": i, "ok": True, **shape}})
        s.case(name=name, about=f"the {name} request and its reply",
               request=request, request_frame=encode_frame(request).hex(),
               reply_frame=encode_frame(reply).hex(),
               reply_shape={"v": 2, "id": i, "ok": True, **shape})
    codes = ["protocol", "invalid_name", "invalid_argument", "conflict", "not_found", "limit",
             "permission_denied", "publisher_busy", "stream_busy"]
    for j, code in enumerate(codes, start=100):
        reply = {"v": 2, "id": j, "ok": False,
                 "error": {"code": code, "message": f"example {code} message"}}
        replies += encode_frame(reply)
        expect_replies.append({"reply": {"v": 2, "id": j, "ok": False,
                                         "error": {"code": code, "message": S}}})
        s.case(name=f"error-{code}", about=f"an error reply with code {code}",
               reply_frame=encode_frame(reply).hex(),
               reply_shape={"v": 2, "id": j, "ok": False, "error": {"code": code, "message": S}})
    mismatch = {"v": 1, "id": 7, "op": "ping"}
    s.case(name="version-mismatch", about="a request of control protocol v1: refused with code "
           "protocol, naming both versions", request=mismatch,
           request_frame=encode_frame(mismatch).hex(),
           reply_shape={"v": 2, "id": 7, "ok": False,
                        "error": {"code": "protocol", "message": S}},
           message_contains=["v1", "v2"])
    s.image("requests.json", (json.dumps(cases_requests, indent=1) + "\n").encode())
    s.image("replies.bin", replies)
    # Reply frames that break the framing rule: a good reply, then the bad frame.
    good = encode_frame({"v": 2, "id": 1, "ok": True})
    bad_frames = [("empty", "a frame of length 0", struct.pack("<I", 0)),
                  ("not-a-map", "a frame whose body is a msgpack array",
                   struct.pack("<I", 2) + msgpack.packb([1])[:2]),
                  ("two-objects", "a frame whose body holds two msgpack objects",
                   struct.pack("<I", 2) + msgpack.packb(1) + msgpack.packb(2)),
                  ("truncated", "a length prefix of 100 and 10 bytes (the connection closed)",
                   struct.pack("<I", 100) + bytes(10))]
    s.case(name="decode-replies", about="every reply above back to back, as read from the socket",
           frames="replies.bin", expect=expect_replies)
    for name, about, bad in bad_frames:
        s.image(f"frames-{name}.bin", good + bad)
        s.case(name=f"decode-{name}", about=f"a good reply, then {about}",
               frames=f"frames-{name}.bin",
               expect=[{"reply": {"v": 2, "id": 1, "ok": True}}, {"error": "protocol"}])
    # Requests a daemon must refuse by the framing rule (run.py --daemon): code protocol, then
    # the daemon closes the connection.
    for name, about, frame, words in (
            ("oversized", "a length prefix past request_max_bytes (default 65536)",
             struct.pack("<I", REQUEST_MAX_BYTES + 1) + b"\x80", ["65536"]),
            ("not-a-map-request", "a request frame whose body is a msgpack array",
             struct.pack("<I", 2) + msgpack.packb([1])[:2], [])):
        s.case(name=name, about=about, request_frame=frame.hex(), closes=True,
               reply_shape={"v": 2, "id": "<any>", "ok": False,
                            "error": {"code": "protocol", "message": S}},
               message_contains=words)
    s.case(name="encode-requests", about="the client encodes every request above",
           encode="requests.json", expect=cases_requests)
    return s


def generate(out: str = HERE) -> list[Suite]:
    suites = [ring_suite(out), group_suite(out), stream_suite(out), control_suite(out)]
    for s in suites:
        s.write()
    return suites


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=HERE, help="directory to write into (default: this one)")
    args = p.parse_args()
    for s in generate(args.out):
        print(f"{s.dir}: {len(s.doc['cases'])} cases, {len(s.files)} files", file=sys.stderr)


if __name__ == "__main__":
    main()
