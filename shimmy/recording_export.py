"""Export recordings to MCAP (https://mcap.dev) with the ``mcap`` library, and the schema a
user registers for a channel's recording (docs/recording.md, "Export and schemas").

A schema is registered by a file ``schema.json`` in the channel's recording directory (``shimmy
record --schema`` writes it; anyone may): ``{"encoding": "jsonschema" | "protobuf", "name":
<type name>, "data": <base64 of the schema: a JSON Schema document, or a serialized protobuf
FileDescriptorSet>}``.  Messages of a channel without one are exported as raw bytes.
"""

from __future__ import annotations

import base64
import json
import os

from shimmy import recording
from shimmy.errors import InvalidArgument

SCHEMA_FILE = "schema.json"
# schema encoding -> MCAP message encoding (the well-known ones of the MCAP registry)
ENCODINGS = {"jsonschema": "json", "protobuf": "protobuf"}
RAW_ENCODING = "application/octet-stream"   # no schema: the payload bytes as published


def register_schema(channel_dir: str, encoding: str, name: str, data: bytes) -> None:
    if encoding not in ENCODINGS:
        raise InvalidArgument(f"schema encoding must be one of {sorted(ENCODINGS)}, got "
                              f"{encoding!r}")
    if encoding == "jsonschema":
        try:
            json.loads(data)
        except ValueError as exc:
            raise InvalidArgument(f"the JSON schema is not JSON: {exc}") from None
    recording.make_dir(channel_dir)
    path = os.path.join(channel_dir, SCHEMA_FILE)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, recording.FILE_MODE)
    with os.fdopen(fd, "w") as fh:
        os.fchmod(fd, recording.FILE_MODE)
        json.dump({"encoding": encoding, "name": name,
                   "data": base64.b64encode(data).decode()}, fh)
    os.replace(tmp, path)


def load_schema(channel_dir: str) -> tuple[str, str, bytes] | None:
    """``(encoding, name, data)`` of the channel's registered schema, or None."""
    path = os.path.join(channel_dir, SCHEMA_FILE)
    try:
        with open(path) as fh:
            doc = json.load(fh)
        encoding, name, data = doc["encoding"], doc["name"], base64.b64decode(doc["data"])
    except FileNotFoundError:
        return None
    except (ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument(f"{path} is not a schema registration ({exc})") from None
    if encoding not in ENCODINGS:
        raise InvalidArgument(f"{path}: schema encoding must be one of {sorted(ENCODINGS)}")
    return encoding, name, data


def export_mcap(root: str, out_path: str, channels: list[str] | None = None) -> dict[str, int]:
    """Write every track of ``root`` (or of ``channels``) to the MCAP file ``out_path``: one
    MCAP channel per track (topic = channel name; a publisher group's member tracks add
    ``/<track>``), log and publish time = the time the recorder read the message's chunk,
    sequence = the message's seq (mod 2^32, MCAP's width).  Returns messages per topic."""
    from mcap.writer import Writer
    have = list(recording.tracks(root))
    names = {n for n, _ in have}
    missing = [c for c in channels or [] if c not in names]
    if missing:
        raise InvalidArgument(f"{root} holds no recording of {', '.join(map(repr, missing))}")
    counts: dict[str, int] = {}
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, recording.FILE_MODE)
    with os.fdopen(fd, "wb") as fh:
        writer = Writer(fh)
        writer.start(profile="", library="shimmy")
        schemas: dict[str, tuple[int, str]] = {}
        for name, track in have:
            if channels and name not in channels:
                continue
            if name not in schemas:
                schema = load_schema(os.path.dirname(track))
                if schema is None:
                    schemas[name] = (0, RAW_ENCODING)
                else:
                    sid = writer.register_schema(name=schema[1], encoding=schema[0],
                                                 data=schema[2])
                    schemas[name] = (sid, ENCODINGS[schema[0]])
            sid, encoding = schemas[name]
            t = os.path.basename(track)
            topic = name if t == recording.MAIN_TRACK else f"{name}/{t}"
            cid = writer.register_channel(topic=topic, message_encoding=encoding, schema_id=sid,
                                          metadata={"shimmy.track": t})
            n = 0
            for seq, when, data in recording.frames_with_time(track):
                writer.add_message(cid, log_time=when, data=data, publish_time=when,
                                   sequence=seq & 0xFFFFFFFF)
                n += 1
            counts[topic] = n
        writer.finish()
    return counts
