"""``shimmy export --mcap``: the file read back with the ``mcap`` reader equals the recording."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest
from mcap.reader import make_reader

import shimmy
from shimmy import recording

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from test_record import payload, start_recorder, stop, track, wait_recorded  # noqa: E402


@pytest.fixture
def root():
    with tempfile.TemporaryDirectory(prefix="shimmy-rec-") as d:
        yield d


@pytest.mark.timeout(120)
def test_mcap_export_read_back_equals_the_recording(daemon, root):
    raw = shimmy.Channel("ex.raw", daemon=daemon.socket, capacity=1 << 16)
    js = shimmy.Channel("ex.json", daemon=daemon.socket, capacity=1 << 16)
    schema = os.path.join(root, "point.schema.json")
    with open(schema, "w") as fh:
        json.dump({"type": "object", "properties": {"x": {"type": "number"}}}, fh)
    rec = start_recorder(daemon.socket, os.path.join(root, "rec"), "ex.raw")
    rec_js = start_recorder(daemon.socket, os.path.join(root, "rec"), "ex.json",
                            extra=("--schema", f"json:{schema}"))
    wait_recorded(os.path.join(root, "rec"), "ex.raw", 0)
    wait_recorded(os.path.join(root, "rec"), "ex.json", 0)
    for i in range(5000):
        raw.publish(payload(i))
        if i % 10 == 0:
            js.publish(json.dumps({"x": i}).encode())
    wait_recorded(os.path.join(root, "rec"), "ex.raw", 5000)
    wait_recorded(os.path.join(root, "rec"), "ex.json", 500)
    stop(rec)
    stop(rec_js)
    out = os.path.join(root, "out.mcap")
    done = subprocess.run([sys.executable, "-m", "shimmy.cli", "export",
                           os.path.join(root, "rec"), "--mcap", out], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    got: dict[str, list] = {"ex.raw": [], "ex.json": []}
    with open(out, "rb") as fh:
        reader = make_reader(fh)
        for sch, channel, message in reader.iter_messages():
            got[channel.topic].append((message.sequence, message.log_time, message.data))
            if channel.topic == "ex.json":
                assert (sch.encoding, channel.message_encoding) == ("jsonschema", "json")
                assert json.loads(sch.data)["properties"]["x"]["type"] == "number"
            else:
                assert sch is None and channel.message_encoding == "application/octet-stream"
    for name in got:
        want = [(seq, t, data) for seq, t, data in
                recording.frames_with_time(track(os.path.join(root, "rec"), name))]
        assert got[name] == want
    assert [d for _, _, d in got["ex.raw"]] == [payload(i) for i in range(5000)]
    assert [json.loads(d)["x"] for _, _, d in got["ex.json"]] == list(range(0, 5000, 10))
    # Only some channels.
    done = subprocess.run([sys.executable, "-m", "shimmy.cli", "export",
                           os.path.join(root, "rec"), "--mcap", out, "--channel", "ex.json"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    with open(out, "rb") as fh:
        topics = {c.topic for c in make_reader(fh).get_summary().channels.values()}
    assert topics == {"ex.json"}
    missing = subprocess.run([sys.executable, "-m", "shimmy.cli", "export",
                              os.path.join(root, "rec"), "--mcap", out, "--channel", "nope"],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "no recording of 'nope'" in missing.stderr
    raw.close()
    js.close()


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, payload: bytes) -> bytes:   # a length-delimited protobuf field
    return _varint(num << 3 | 2) + _varint(len(payload)) + payload


def _point_descriptor_set() -> bytes:
    """A serialized FileDescriptorSet for ``message demo.Point { int64 x = 1; }``, written
    out by hand (google.protobuf is not a dependency): FieldDescriptorProto name=1, number=3,
    label=4 (1 optional), type=5 (3 int64)."""
    field = (_field(1, b"x") + _varint(3 << 3) + _varint(1) + _varint(4 << 3) + _varint(1)
             + _varint(5 << 3) + _varint(3))
    message = _field(1, b"Point") + _field(2, field)
    file = _field(1, b"point.proto") + _field(2, b"demo") + _field(4, message)
    return _field(1, file)


@pytest.mark.timeout(120)
def test_mcap_export_with_a_protobuf_schema(daemon, root):
    ch = shimmy.Channel("ex.pb", daemon=daemon.socket, capacity=1 << 16)
    desc = os.path.join(root, "point.desc")
    with open(desc, "wb") as fh:
        fh.write(_point_descriptor_set())
    rec = start_recorder(daemon.socket, os.path.join(root, "rec"), "ex.pb",
                         extra=("--schema", f"protobuf:{desc}:demo.Point"))
    wait_recorded(os.path.join(root, "rec"), "ex.pb", 0)
    msgs = [_varint(1 << 3) + _varint(i) for i in range(100)]   # Point{x=i}
    for m in msgs:
        ch.publish(m)
    wait_recorded(os.path.join(root, "rec"), "ex.pb", 100)
    stop(rec)
    out = os.path.join(root, "pb.mcap")
    done = subprocess.run([sys.executable, "-m", "shimmy.cli", "export",
                           os.path.join(root, "rec"), "--mcap", out], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    with open(out, "rb") as fh:
        got = list(make_reader(fh).iter_messages())
    assert [m.data for _, _, m in got] == msgs
    sch, channel, _ = got[0]
    assert (sch.name, sch.encoding, channel.message_encoding) == \
        ("demo.Point", "protobuf", "protobuf")
    assert sch.data == _point_descriptor_set()
    # A malformed registration is refused naming the rule.
    bad = subprocess.run([sys.executable, "-m", "shimmy.cli", "record", "ex.pb", "--dir",
                          os.path.join(root, "rec2"), "--daemon", daemon.socket, "--schema",
                          f"protobuf:{desc}"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "expected json:FILE or protobuf:FILE:TYPE" in bad.stderr
    ch.close()
