"""The Python client of the conformance contract (spec/vectors/README.md).

``python -m shimmy.conform [--path view|copy|batch] COMMAND ...`` maps a vector's image file
and runs the real ring code over it (``shimmy.ring``, ``shimmy.stream_ring``: the C paths where
the extension is built, the Python paths with ``SHIMMY_PURE_PYTHON=1``), printing one JSON line
per result.  ``--path`` picks which of the SDK's read paths reads a channel: ``view`` (zero-copy
``take``), ``copy`` (``take_bytes``) or ``batch`` (``take_many_bytes``); each must print the
same lines.  The runner is ``spec/vectors/run.py``.
"""

from __future__ import annotations

import argparse
import json
import mmap
import struct
import sys
from typing import Any, Callable

import msgpack

from shimmy import ring, stream_ring
from shimmy.errors import ProtocolError, ShimmyError

FRAME_LENGTH = struct.Struct("<I")   # control protocol v2: u32 little-endian length prefix
BATCH = 3                            # messages per take_many_bytes call on the batch path
NO_SEMAPHORE_PREFIX = "/shimmy-conform-no-semaphore."   # vector images have no semaphores


def emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")


def emit_error(exc: ShimmyError, **extra: Any) -> None:
    emit({"error": exc.code, "message": str(exc), **extra})


def map_image(path: str) -> mmap.mmap:
    """A shared, writable mapping of the image file, as a client maps /dev/shm."""
    with open(path, "r+b") as f:
        return mmap.mmap(f.fileno(), 0)


def parse_start(text: str) -> tuple[int, int]:
    pos, _, seq = text.partition(":")
    return int(pos), int(seq)


class _NoSemaphore:
    """A vector's stream has no semaphores: a post finds nobody to wake."""

    def release(self) -> None:
        pass

    def acquire(self, timeout: float | None = None) -> None:
        pass


# -- reading ---------------------------------------------------------------------------------
def _drain(reader: ring.RingReader, path: str, extra: dict[str, Any]) -> None:
    """Print every message ``reader`` can read now, then the end line."""
    mm = reader.v.mm
    while True:
        lost_before = reader.lost_total
        if path == "view":
            got = reader.take()
            if got is None:
                break
            _pos, off, length, seq, _lost = got
            items = [(seq, mm[off:off + length])]
        elif path == "copy":
            data = reader.take_bytes()
            if data is None:
                break
            items = [(reader._expect - 1, data)]
        else:
            batch = reader.take_many_bytes(BATCH)
            if batch is None:
                break
            first = reader._expect - len(batch)
            items = [(first + i, data) for i, data in enumerate(batch)]
        lost = reader.lost_total - lost_before
        if lost:   # a batch reports its loss before its first message (exact when it is one gap)
            emit({"lost": lost, **extra})
        for seq, data in items:
            emit({"seq": seq, "data": bytes(data).hex(), **extra})


def read_ring(args: argparse.Namespace) -> None:
    view = ring.RingView(map_image(args.image))
    pos, seq = parse_start(args.start)
    reader = ring.RingReader(view, args.slot, pos, seq)
    _drain(reader, args.path, {})
    emit({"end": "empty"})


def read_group(args: argparse.Namespace) -> None:
    channel = ring.RingView(map_image(args.image))
    epoch = channel.u32[ring.I_GROUP_EPOCH]
    emit({"group_epoch": epoch})
    for spec in args.member:
        ident, _, rest = spec.partition("=")
        path, _, start = rest.rpartition("@")
        pos, seq = parse_start(start)
        member = ring.RingView(map_image(path))
        reader = ring.GroupReader(member, args.slot, pos, seq, channel.u32, epoch,
                                  publisher=int(ident))
        _drain(reader, args.path, {"publisher": int(ident)})
    emit({"end": "empty"})


def read_stream(args: argparse.Namespace) -> None:
    view = stream_ring.StreamView(map_image(args.image))
    reader = stream_ring.ReaderCursor(view, _NoSemaphore(), _NoSemaphore(), ring.fence, spin_us=0)
    while True:
        avail = reader.available()
        if avail:
            emit({"data": reader.read_bytes(avail, avail).hex()})
            continue
        if reader.at_end():
            emit({"end": "eof"})
        else:
            emit({"end": "empty"})
        return


def cmd_read(args: argparse.Namespace) -> None:
    try:
        {"ring": read_ring, "group": read_group, "stream": read_stream}[args.kind](args)
    except ShimmyError as exc:
        emit_error(exc)


def cmd_point(args: argparse.Namespace) -> None:
    try:
        pos, seq = ring.stream_point(ring.RingView(map_image(args.image)), oldest=args.oldest)
    except ShimmyError as exc:
        emit_error(exc)
    else:
        emit({"position": pos, "seq": seq})


# -- writing ---------------------------------------------------------------------------------
def _ring_op(writer: ring.RingWriter, op: dict[str, Any]) -> dict[str, Any]:
    timeout = op.get("timeout")
    kind = op["op"]
    if kind == "publish":
        return {"seq": writer.publish(bytes.fromhex(op["data"]), timeout)}
    if kind == "publish_many":
        return {"published": writer.publish_many([bytes.fromhex(d) for d in op["items"]],
                                                 timeout)}
    if kind == "loan":
        data = bytes.fromhex(op["data"])
        view = writer.claim(op["size"], timeout)
        view[:len(data)] = data
        view.release()
        return {"seq": writer.commit_claim(op["size"])}
    raise SystemExit(f"unknown ring op {kind!r} (publish, publish_many, loan)")


def _stream_op(writer: stream_ring.WriterCursor, op: dict[str, Any]) -> dict[str, Any]:
    kind = op["op"]
    if kind == "write":
        return {"written": writer.write_nowait(memoryview(bytes.fromhex(op["data"])))}
    if kind == "close":
        writer.close()
        return {"closed": True}
    raise SystemExit(f"unknown stream op {kind!r} (write, close)")


def cmd_write(args: argparse.Namespace) -> None:
    with open(args.ops) as f:
        ops = json.load(f)
    apply: Callable[[dict[str, Any]], dict[str, Any]]
    try:
        if args.kind == "ring":
            view = ring.RingView(map_image(args.image))
            rw = ring.RingWriter(view, ring.Wakeups(view, NO_SEMAPHORE_PREFIX))
            emit({"next_seq": rw.next_seq})
            apply = lambda op: _ring_op(rw, op)   # noqa: E731
        else:
            sview = stream_ring.StreamView(map_image(args.image))
            sw = stream_ring.WriterCursor(sview, _NoSemaphore(), _NoSemaphore(), ring.fence,
                                          spin_us=0)
            apply = lambda op: _stream_op(sw, op)   # noqa: E731
    except ShimmyError as exc:
        emit_error(exc)
        return
    for op in ops:
        try:
            emit(apply(op))
        except ShimmyError as exc:
            batch = op["op"] == "publish_many"
            emit_error(exc, **({"published": getattr(exc, "published", 0)} if batch else {}))


# -- control frames ----------------------------------------------------------------------------
def encode_frame(request: dict[str, Any]) -> bytes:
    body = msgpack.packb(request, use_bin_type=True)
    return FRAME_LENGTH.pack(len(body)) + body


def iter_frames(data: bytes):
    """Split reply bytes into frames and yield each decoded map; raises ProtocolError at the
    first frame that breaks the framing rule (spec/control.md, "Framing").  Replies have no
    length limit (a request has: request_max_bytes, checked by the daemon)."""
    pos = 0
    while pos < len(data):
        if len(data) - pos < 4:
            raise ProtocolError(f"truncated frame: {len(data) - pos} bytes where a 4-byte length "
                                f"prefix was expected")
        (n,) = FRAME_LENGTH.unpack_from(data, pos)
        if n < 1:
            raise ProtocolError("frame of 0 bytes: a frame holds exactly one msgpack map")
        body = data[pos + 4:pos + 4 + n]
        if len(body) < n:
            raise ProtocolError(f"truncated frame: {len(body)} of {n} bytes")
        try:
            obj = msgpack.unpackb(body, raw=False, strict_map_key=False)
        except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
            raise ProtocolError(f"frame is not one msgpack map: {exc}") from None
        if not isinstance(obj, dict):
            raise ProtocolError(f"frame holds a msgpack {type(obj).__name__}, not a map")
        yield obj
        pos += 4 + n


def cmd_frames(args: argparse.Namespace) -> None:
    if args.encode:
        with open(args.encode) as f:
            for request in json.load(f):
                emit({"frame": encode_frame(request).hex()})
        return
    with open(args.decode, "rb") as f:
        data = f.read()
    try:
        for reply in iter_frames(data):
            emit({"reply": reply})
    except ProtocolError as exc:
        emit_error(exc)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m shimmy.conform",
                                description="Shimmy's conformance client (spec/vectors/README.md)")
    p.add_argument("--path", choices=("view", "copy", "batch"), default="view",
                   help="which read path reads a channel (default view)")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("conform-read")
    r.add_argument("--kind", choices=("ring", "group", "stream"), default="ring")
    r.add_argument("--image", required=True)
    r.add_argument("--start", default="0:0")
    r.add_argument("--slot", type=int, default=0)
    r.add_argument("--member", action="append", default=[])
    r.set_defaults(func=cmd_read)
    pt = sub.add_parser("conform-point")
    pt.add_argument("--image", required=True)
    pt.add_argument("--oldest", action="store_true")
    pt.set_defaults(func=cmd_point)
    w = sub.add_parser("conform-write")
    w.add_argument("--kind", choices=("ring", "stream"), default="ring")
    w.add_argument("--image", required=True)
    w.add_argument("--ops", required=True)
    w.set_defaults(func=cmd_write)
    f = sub.add_parser("conform-frames")
    g = f.add_mutually_exclusive_group(required=True)
    g.add_argument("--encode")
    g.add_argument("--decode")
    f.set_defaults(func=cmd_frames)
    return p


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
