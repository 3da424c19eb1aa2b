"""Bytes in and out of the command line: stdin split into messages, messages written to stdout.

Nothing here decodes input: ``pub`` publishes the bytes it reads, and ``sub`` chooses how to show
them (``--format``).  Input is read in bounded chunks, so a message that exceeds the channel's
largest message is refused as soon as it grows past that limit, never buffered whole.
"""

from __future__ import annotations

import base64
import codecs
import json
from collections.abc import Iterator
from typing import BinaryIO

from shimmy.errors import MessageTooLarge

READ_CHUNK = 1 << 16
FORMATS = ("text", "hex", "raw", "json")


def parse_delimiter(text: str) -> bytes:
    """``"\\n"``, ``"\\0"``, ``"\\x1e"`` or literal text -> the delimiter's bytes (not empty)."""
    value = codecs.escape_decode(text.encode("utf-8", "surrogateescape"))[0]
    if not isinstance(value, bytes) or not value:
        raise ValueError("the delimiter must be at least one byte")
    return value


class MessageReader:
    """Messages from a binary stream: split on ``delimiter``, or the whole stream as one message
    when ``delimiter`` is None.  ``limit`` (bytes, settable while reading) bounds each message."""

    def __init__(self, src: BinaryIO, delimiter: bytes | None, limit: int, what: str = "stdin"):
        self.src = src
        self.delimiter = delimiter
        self.limit = limit
        self.what = what
        self.count = 0       # messages produced so far
        self.offset = 0      # bytes consumed so far (start of the current message)

    def _too_large(self, size: int) -> MessageTooLarge:
        return MessageTooLarge(
            f"message {self.count + 1} on {self.what} (from byte {self.offset}) exceeds the "
            f"largest message of {self.limit} bytes (already {size} bytes read); raise the "
            f"channel's capacity (pub --capacity; largest message = capacity/2 - 16) or split "
            f"the input")

    def __iter__(self) -> Iterator[bytes]:
        read = getattr(self.src, "read1", self.src.read)
        delim = self.delimiter
        buf = bytearray()
        scanned = 0  # bytes of buf already searched for the delimiter
        while True:
            data = read(READ_CHUNK)
            if not data:
                break
            buf += data
            if delim is not None:
                start = 0
                while True:
                    i = buf.find(delim, max(start, scanned - len(delim) + 1))
                    if i < 0:
                        break
                    if i - start > self.limit:
                        raise self._too_large(i - start)
                    msg = bytes(buf[start:i])
                    start = i + len(delim)
                    self.offset += len(msg) + len(delim)
                    self.count += 1
                    yield msg
                    scanned = start
                if start:
                    del buf[:start]
                scanned = len(buf)
            if len(buf) > self.limit:
                raise self._too_large(len(buf))
        if buf or delim is None:
            self.count += 1
            self.offset += len(buf)
            yield bytes(buf)


def render_message(data: bytes, fmt: str, *, seq: int, lost: int, with_seq: bool,
                   delimiter: bytes) -> bytes:
    """One received message as the bytes ``sub --format`` prints.

    text: UTF-8 with undecodable bytes shown as ``\\xNN`` escapes; hex: lowercase hex digits;
    raw: the bytes themselves; each followed by ``delimiter``.  json: one object per line with
    ``seq``, ``lost``, ``size`` and either ``text`` (valid UTF-8) or ``base64``.
    """
    if fmt == "json":
        obj: dict = {"seq": seq, "lost": lost, "size": len(data)}
        try:
            obj["text"] = data.decode("utf-8")
        except UnicodeDecodeError:
            obj["base64"] = base64.b64encode(data).decode("ascii")
        return json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n"
    if fmt == "text":
        body = data.decode("utf-8", "backslashreplace").encode("utf-8")
    elif fmt == "hex":
        body = data.hex().encode("ascii")
    else:
        body = data
    prefix = f"{seq}\t".encode("ascii") if with_seq else b""
    return prefix + body + delimiter
