"""Self-checking payloads: a frame's bytes are a function of its sequence number.

``make(seq)`` gives a message whose first 8 bytes are ``seq`` and next 4 a CRC32 of the rest, so
a receiver tells a torn or foreign frame from a good one without any side channel; ``check``
returns why a payload is bad (None when good).  Sizes vary with ``seq`` (16 bytes up to
``max_size``) so that small rings wrap and pad often.
"""

from __future__ import annotations

import random
import struct
import zlib

_HEAD = struct.Struct("<QI")


def size_of(seq: int, max_size: int) -> int:
    rng = random.Random(seq * 2654435761 & 0xFFFFFFFF)
    return rng.choice((12, max_size)) if seq % 11 == 0 else rng.randint(12, max_size)


def make(seq: int, max_size: int, size: int | None = None) -> bytes:
    n = size_of(seq, max_size) if size is None else max(size, 12)
    body = random.Random(seq).randbytes(n - 12)
    return _HEAD.pack(seq, zlib.crc32(body)) + body


def check(data, seq: int) -> str | None:
    """Why ``data`` is not the message ``seq`` (None when it is)."""
    data = bytes(data)
    if len(data) < 12:
        return f"seq {seq}: {len(data)} bytes, shorter than a payload header"
    got_seq, crc = _HEAD.unpack_from(data)
    if got_seq != seq:
        return f"seq {seq}: payload says seq {got_seq}"
    if zlib.crc32(data[12:]) != crc:
        return f"seq {seq}: checksum mismatch (torn frame)"
    return None


def index(data) -> int | None:
    """The sequence number ``data`` was made for (None when it is torn or foreign): for
    receivers whose ring numbering differs from the publisher's own count (a message relayed
    through another node's ring after its source restarted)."""
    data = bytes(data)
    if len(data) < 12:
        return None
    seq = _HEAD.unpack_from(data)[0]
    return seq if check(data, seq) is None else None


_PERIOD = 1_000_003    # a prime, longer than any chunk, so a misplaced chunk never matches
_BLOCK = random.Random(0).randbytes(_PERIOD) * 2


def stream_bytes(start: int, n: int) -> bytes:
    """Bytes ``[start, start + n)`` (n <= 1 MB) of the endless checkable byte stream."""
    at = start % _PERIOD
    return _BLOCK[at:at + n]
