"""Bad input gets a specific error naming what was wrong, and the daemon stays up."""

from __future__ import annotations

import os
import socket
import time

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import shimmy
from shimmy.protocol import FRAME_HEADER, PROTOCOL_VERSION, frame, read_frame


@pytest.mark.parametrize("name", ["", "a//b", "/lead", "trail/", "sp ace", "a/../b", ".", "x" * 201,
                                  "ümlaut", "semi;colon", None, 42, b"bytes"])
def test_invalid_names_raise_invalid_name(daemon, name):
    with pytest.raises(shimmy.InvalidName, match="rule") as info:
        shimmy.Channel(name, daemon=daemon.socket)
    assert isinstance(info.value, ValueError)


def test_valid_names(daemon):
    for name in ["a", "sensors/temp", "A-b_c.d/e", "x" * 200]:
        shimmy.Channel(name, daemon=daemon.socket).close()


def test_oversize_message_names_the_limit(daemon):
    with shimmy.Channel("big", daemon=daemon.socket, capacity=8192) as ch:
        assert ch.max_message == 8192 // 2 - 16
        with pytest.raises(shimmy.MessageTooLarge, match=r"4081 bytes exceeds .* 4080 bytes"):
            ch.publish(b"x" * 4081)
        with pytest.raises(shimmy.MessageTooLarge, match="loan of 4081 bytes"):
            ch.loan(4081)   # refused when asked, before any room is reserved
        sub = ch.subscribe()
        ch.publish(b"x" * 4080)  # the limit itself is fine
        assert len(sub.receive(timeout=1).data) == 4080


@pytest.mark.parametrize("kwargs, match", [
    ({"capacity": 1000}, "power of two"),
    ({"capacity": 1 << 31}, "power of two between"),
    ({"mode": "fast"}, "mode must be one of"),
    ({"spin_us": -1}, "spin_us"),
])
def test_bad_options(daemon, kwargs, match):
    with pytest.raises(shimmy.InvalidArgument, match=match):
        shimmy.Channel("opts", daemon=daemon.socket, **kwargs)


def test_conflicting_options_are_refused(daemon):
    with shimmy.Channel("conflict", daemon=daemon.socket, mode="lossy", capacity=8192):
        with pytest.raises(shimmy.ChannelConflict, match="mode='lossy'"):
            shimmy.Channel("conflict", daemon=daemon.socket, mode="reliable")
        with pytest.raises(shimmy.ChannelConflict, match="capacity=8192"):
            shimmy.Channel("conflict", daemon=daemon.socket, capacity=16384)
        shimmy.Channel("conflict", daemon=daemon.socket).close()  # no options: accept


def test_unreachable_daemon_says_where_and_how(tmp_path):
    path = str(tmp_path / "nobody.sock")
    with pytest.raises(shimmy.DaemonUnavailable, match="shimmy daemon --socket") as info:
        shimmy.Channel("x", daemon=path)
    assert path in str(info.value) and isinstance(info.value, ConnectionError)


def test_second_publisher_is_refused_with_the_rule(daemon):
    import subprocess, sys  # noqa: E401
    with shimmy.Channel("onepub", daemon=daemon.socket) as ch:
        ch.publish(b"mine")
        code = ("import shimmy,sys\nch=shimmy.Channel('onepub',daemon=sys.argv[1])\n"
                "try:\n ch.publish(b'x')\nexcept shimmy.ShimmyError as e:\n print(e)\n")
        out = subprocess.run([sys.executable, "-c", code, daemon.socket], capture_output=True,
                             text=True, timeout=30).stdout
        assert "already has a publisher" in out


def test_too_many_subscribers(daemon_factory, tmp_path):
    cfg = tmp_path / "limits.toml"
    cfg.write_text("max_subscribers = 2\nmax_channels = 2\n")
    d = daemon_factory("--config", str(cfg))
    with shimmy.Channel("a", daemon=d.socket) as ch:
        ch.subscribe(), ch.subscribe()
        with pytest.raises(shimmy.LimitExceeded, match=r"max_subscribers \(2\)"):
            ch.subscribe()
        with shimmy.Channel("b", daemon=d.socket):
            with pytest.raises(shimmy.LimitExceeded, match=r"max_channels \(2\)"):
                shimmy.Channel("c", daemon=d.socket)


def test_shm_space_is_checked_before_allocating(daemon_factory, tmp_path):
    cfg = tmp_path / "space.toml"
    st = os.statvfs("/dev/shm")
    cfg.write_text(f"shm_reserve = {st.f_blocks * st.f_frsize}\n")  # more than the whole tmpfs
    d = daemon_factory("--config", str(cfg))
    with pytest.raises(shimmy.LimitExceeded, match="shm_reserve"):
        shimmy.Channel("nospace", daemon=d.socket)
    assert d.shm_objects() == []


def test_unknown_config_setting_is_refused(daemon_factory, tmp_path):
    cfg = tmp_path / "typo.toml"
    cfg.write_text("max_channel = 3\n")
    with pytest.raises(RuntimeError, match="unknown settings"):
        daemon_factory("--config", str(cfg))


def _raw(daemon):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(5)
    sock.connect(daemon.socket)
    return sock


def _reply(sock, timeout=5.0):
    return msgpack.unpackb(read_frame(sock, time.monotonic() + timeout), raw=False)


def _ask(sock, payload, timeout=5.0):
    sock.sendall(frame(payload))
    return _reply(sock, timeout)


def _closed(sock) -> bool:
    """The daemon closed the connection (end-of-file within 5 s)."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _ping_ok(daemon):
    sock = _raw(daemon)
    try:
        reply = _ask(sock, msgpack.packb({"v": PROTOCOL_VERSION, "id": 7, "op": "ping"}))
        return reply["ok"] and reply["id"] == 7
    finally:
        sock.close()


@pytest.mark.parametrize("payload, code, closes", [
    (b"\xc1", "protocol", True),                                 # never-valid msgpack byte
    (msgpack.packb([1, 2, 3]), "protocol", True),                # not a map
    (msgpack.packb({"v": 1}) + msgpack.packb({"v": 1}), "protocol", True),   # two maps
    (msgpack.packb({"v": 99, "op": "ping"}), "protocol", False),  # wrong version
    (msgpack.packb({"v": PROTOCOL_VERSION, "op": "explode"}), "protocol", False),
    (msgpack.packb({"v": PROTOCOL_VERSION, "op": "open", "client": "me"}), "invalid_argument",
     False),
    (msgpack.packb({"v": PROTOCOL_VERSION, "op": "open", "client": 12345}), "invalid_argument",
     False),
    (msgpack.packb({"v": PROTOCOL_VERSION, "op": "delete", "name": "../etc"}), "invalid_name",
     False),
    (msgpack.packb({"v": PROTOCOL_VERSION, "op": "delete", "name": "nothere"}),
     "invalid_argument", False),                               # deleting needs a client
])
def test_malformed_requests_get_specific_errors(daemon, payload, code, closes):
    sock = _raw(daemon)
    try:
        reply = _ask(sock, payload)
        assert reply["ok"] is False and reply["error"]["code"] == code, reply
        if closes:   # bytes that are not one msgpack map end the connection (spec/control.md)
            assert _closed(sock)
        else:        # any other error leaves it usable
            assert _ask(sock, msgpack.packb({"v": PROTOCOL_VERSION, "id": 3, "op": "ping"}))["ok"]
    finally:
        sock.close()
    assert _ping_ok(daemon)


def test_wrong_version_names_both_versions(daemon):
    sock = _raw(daemon)
    try:
        reply = _ask(sock, msgpack.packb({"v": 1, "id": 4, "op": "ping"}))
    finally:
        sock.close()
    assert reply["id"] == 4 and reply["error"]["code"] == "protocol"
    assert "control protocol v1" in reply["error"]["message"]
    assert f"v{PROTOCOL_VERSION}" in reply["error"]["message"]


@pytest.mark.parametrize("head", [FRAME_HEADER.pack(65537), FRAME_HEADER.pack((1 << 32) - 1),
                                  FRAME_HEADER.pack(0)])
def test_oversized_and_empty_frames_are_refused_unread(daemon, head):
    sock = _raw(daemon)
    try:
        sock.sendall(head + b"x" * 100)   # the body need never arrive
        reply = _reply(sock)
        assert reply["ok"] is False and reply["error"]["code"] == "protocol", reply
        assert "request_max_bytes=65536" in reply["error"]["message"], reply
        assert _closed(sock)
    finally:
        sock.close()
    assert _ping_ok(daemon)


def test_a_client_of_protocol_v1_is_told_to_upgrade(daemon):
    """A ZeroMQ DEALER (control protocol v1) opens with its ZMTP greeting."""
    sock = _raw(daemon)
    try:
        sock.sendall(b"\xff" + bytes(8) + b"\x7f" + bytes(54))
        reply = _reply(sock)
        assert reply["error"]["code"] == "protocol", reply
        assert "control protocol v1" in reply["error"]["message"], reply
        assert _closed(sock)
    finally:
        sock.close()


def test_requests_pipelined_on_one_connection_are_answered_in_order(daemon):
    sock = _raw(daemon)
    try:
        sock.sendall(b"".join(frame(msgpack.packb({"v": PROTOCOL_VERSION, "id": i, "op": "ping"}))
                              for i in range(1, 501)))
        assert [_reply(sock)["id"] for _ in range(500)] == list(range(1, 501))
    finally:
        sock.close()


def test_half_frames_and_garbage_are_closed_and_others_served(daemon):
    """Half a frame (the header promising bytes that never come) and raw garbage: both
    connections end, the first after control_request_timeout, and a client is served meanwhile."""
    half, garbage = _raw(daemon), _raw(daemon)
    try:
        half.sendall(FRAME_HEADER.pack(100) + b"\x81")
        garbage.sendall(b"\xfe" * 4 + os.urandom(5000))
        assert _ping_ok(daemon)
        half.settimeout(15)
        assert _closed(half), "a half frame was held open past control_request_timeout"
        assert _reply(garbage)["error"]["code"] == "protocol"
        assert _closed(garbage)
    finally:
        half.close()
        garbage.close()
    assert _ping_ok(daemon)


def test_garbage_on_the_session_socket(daemon):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(daemon.socket + ".session")
    s.sendall(os.urandom(5000))
    s.close()
    assert _ping_ok(daemon)


_msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**64 - 1) | st.floats() |
    st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12)
_requests = st.fixed_dictionaries(
    {"v": st.sampled_from([PROTOCOL_VERSION, 0, "1"]),
     "op": st.sampled_from(["open", "subscribe", "unsubscribe", "publish", "unpublish", "close",
                            "list", "stat", "delete", "hello", "ping", "bogus"])},
    optional={"id": _msgpack_values, "client": _msgpack_values, "name": _msgpack_values,
              "mode": _msgpack_values, "capacity": _msgpack_values, "start": _msgpack_values,
              "slot": _msgpack_values, "pid": _msgpack_values, "create": _msgpack_values})


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(req=_requests, raw=st.binary(max_size=64))
def test_fuzzed_control_messages_never_hurt_the_daemon(daemon, req, raw):
    sock = _raw(daemon)
    try:
        reply = _ask(sock, msgpack.packb(req))
        assert reply["v"] == PROTOCOL_VERSION and isinstance(reply["ok"], bool)
        if not reply["ok"]:
            assert reply["error"]["code"] != "error", reply  # no internal errors
        reply = _ask(sock, raw)
        assert isinstance(reply["ok"], bool)
    finally:
        sock.close()
    assert _ping_ok(daemon)


def test_a_request_cannot_speak_for_another_client(daemon):
    with shimmy.Channel("mine", daemon=daemon.socket) as ch:
        client = ch._client
        sock = _raw(daemon)
        try:
            for token in (None, "0" * 32, 42):
                req = {"v": PROTOCOL_VERSION, "id": 1, "op": "subscribe", "name": "mine",
                       "client": client.id}
                if token is not None:
                    req["token"] = token
                reply = _ask(sock, msgpack.packb(req))
                assert reply["error"]["code"] == "permission_denied", reply
        finally:
            sock.close()
        assert ch.subscribe() is not None  # the real client is unaffected


# -- finding 9 (issue 8): loose request fields and settings ------------------------------------

@pytest.mark.parametrize("pid", [-5, 0, 2**63, 2**64 - 1, 1 << 22 + 1, "12", 1.5, None])
def test_hello_pid_out_of_range_is_invalid_argument(daemon, pid):
    """pid -5 and 2**63 were accepted, then failed as `internal daemon error: ValueError`."""
    sock = _raw(daemon)
    try:
        reply = _ask(sock, msgpack.packb({"v": PROTOCOL_VERSION, "id": 1, "op": "hello",
                                          "pid": pid}))
        assert reply["error"]["code"] == "invalid_argument", reply
        assert "'pid'" in reply["error"]["message"]
    finally:
        sock.close()
    assert _ping_ok(daemon)


@pytest.mark.parametrize("token", ["ü" * 32, "\x00" * 32, b"\xff" * 32, "x" * 10_000, [1], 3.5])
def test_bad_tokens_are_refused_not_internal_errors(daemon, token):
    """A non-ASCII token was `internal daemon error: TypeError` (compare_digest)."""
    with shimmy.Channel("tok", daemon=daemon.socket) as ch:
        sock = _raw(daemon)
        try:
            reply = _ask(sock, msgpack.packb({"v": PROTOCOL_VERSION, "id": 1, "op": "subscribe",
                                              "name": "tok", "client": ch._client.id,
                                              "token": token}))
            assert reply["error"]["code"] == "permission_denied", reply
        finally:
            sock.close()


@pytest.mark.parametrize("op, fields, field", [
    ("open", {"capacity": 2**63}, "capacity"),
    ("open", {"capacity": -1}, "capacity"),
    ("open", {"create": "yes"}, "create"),
    ("open", {"mode": "m" * 1000}, "mode"),
    ("unsubscribe", {"slot": -1}, "slot"),
    ("unsubscribe", {"slot": 2**64 - 1}, "slot"),
    ("stream_close", {"role": "writer", "serial": -7}, "serial"),
    ("stream_open", {"role": "writer", "capacity": 2**64 - 1}, "capacity"),
])
def test_every_request_field_is_range_checked(daemon, op, fields, field):
    with shimmy.Channel("ranges", daemon=daemon.socket) as ch:
        sock = _raw(daemon)
        try:
            req = {"v": PROTOCOL_VERSION, "id": 1, "op": op, "name": "ranges",
                   "client": ch._client.id, "token": ch._client._token, **fields}
            reply = _ask(sock, msgpack.packb(req))
            assert reply["error"]["code"] == "invalid_argument", reply
            assert repr(field) in reply["error"]["message"], reply
        finally:
            sock.close()
    assert _ping_ok(daemon)


def test_request_ids_out_of_range_are_refused(daemon):
    sock = _raw(daemon)
    try:
        for rid in (-1, "7", 1.0):
            reply = _ask(sock, msgpack.packb({"v": PROTOCOL_VERSION, "id": rid, "op": "ping"}))
            assert reply["error"]["code"] == "invalid_argument" and reply["id"] is None, reply
    finally:
        sock.close()


@pytest.mark.parametrize("text, extra, match", [
    ('max_channels = "many"\n', (), "setting max_channels must be int, got str"),
    ('heartbeat_interval = "fast"\n', (), "heartbeat_interval must be float"),
    ("lease_timeout = 2.0\nsession_timeout = 0.5\n", (), "session_timeout"),
    ('object_mode = "0666"\n', (), "object_mode=0666 gives other users access"),
    ('socket_mode = "rw"\n', (), "socket_mode must be an octal mode"),
    ('channel_group = "no-such-group-xyz"\n', (), "channel_group: no group named"),
    ('channel_rules = ["a/** serviceaccount=x"]\n', (), "service accounts are not visible"),
    ('access = "wide"\n', (), "access must be one of owner, closed, open"),
    ("quota_sessions = 0\n", (), "quota_sessions must be >= 1"),
    ("", ("--shm-dir", "{tmp}/nonexistent"), "shm_dir: .*/nonexistent is not an existing "
                                            "directory"),
])
def test_bad_settings_are_startup_errors_naming_the_setting(daemon_factory, tmp_path, text,
                                                            extra, match):
    """A wrong-typed value or `--shm-dir /nonexistent` started fine and failed at the first
    publish as an internal error."""
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    with pytest.raises(RuntimeError, match="bad settings: .*" + match):
        daemon_factory("--config", str(cfg), *(e.format(tmp=tmp_path) for e in extra))
