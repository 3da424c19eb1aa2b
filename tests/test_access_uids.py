"""Access control proved with real, unprivileged uids (docs/security.md, the recipes).

Each test runs a real daemon (as root, or as an unprivileged uid) and client processes whose
uid/gid/groups are those of the system users ``shimmy-a``, ``shimmy-b`` (both in group
``shimmy-share``) and ``shimmy-out`` (an outsider), created by the fixture when absent
(tests/abuse/uids.py).  The kernel, not the test, decides who may open what.
"""

from __future__ import annotations

import grp
import os
import signal
import stat
import subprocess
import tempfile
import time

import pytest

from tests.abuse import uids

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creating users needs root")

CLIENT = r"""
import json, os, sys
import posix_ipc
import shimmy
from shimmy.sdk.client import get_client, open_shared_memory
sock, action, name = sys.argv[1:4]
extra = sys.argv[4:]
out = {"ok": True}
try:
    if action == "create":
        shimmy.Channel(name, daemon=sock).close()
    elif action == "publish":
        with shimmy.Channel(name, daemon=sock) as ch:
            for i in range(int(extra[0])):
                ch.publish(b"m%d" % i, timeout=10)
    elif action == "subscribe":
        with shimmy.Channel(name, daemon=sock) as ch:
            sub = ch.subscribe()
            print(json.dumps({"ready": True}), flush=True)
            out["got"] = [bytes(sub.receive(timeout=10)).decode() for _ in range(int(extra[0]))]
    elif action == "delete":
        get_client(sock).request("delete", name=name)
    elif action == "list":
        reply = get_client(sock).request("list")
        out["names"] = [c["name"] for c in reply["channels"]]
        out["hidden"] = reply["hidden"]
    elif action == "stream_writer":     # hold a stream's writer end until stdin closes
        w = shimmy.Stream(name, daemon=sock).writer()
        print(json.dumps({"ready": True}), flush=True)
        sys.stdin.read()
        w.close()
    elif action == "stream_reader":
        shimmy.Stream(name, daemon=sock).reader().close()
    elif action == "raw_open":          # what the kernel allows, bypassing the daemon
        posix_ipc.SharedMemory(name).close_fd()
    elif action == "sdk_open":          # the SDK's own open of a daemon object
        open_shared_memory(name).close_fd()
except Exception as exc:
    out = {"ok": False, "error": type(exc).__name__, "message": str(exc),
           "shimmy": isinstance(exc, shimmy.ShimmyError)}
print(json.dumps(out), flush=True)
"""


@pytest.fixture(scope="module")
def users():
    return uids.ensure_users()


@pytest.fixture
def shared_dir():
    """A daemon directory other uids may enter (pytest's temporary directories are 0700)."""
    path = tempfile.mkdtemp(prefix="shimmy-uid-")
    os.chmod(path, 0o755)
    yield path
    subprocess.run(["rm", "-rf", path], check=False)


def client(user: str, sock: str, action: str, name: str, *extra: str) -> dict:
    return uids.run_as(user, CLIENT, sock, action, name, *extra)


def objects(d) -> dict[str, os.stat_result]:
    return {e: os.stat(os.path.join("/dev/shm", e)) for e in d.shm_objects()}


def assert_nothing_for_others(d) -> None:
    for entry, st in objects(d).items():
        assert stat.S_IMODE(st.st_mode) & 0o007 == 0, f"{entry} is {st.st_mode:o}"
    for path in (d.socket + ".lock",):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_a_channel_belongs_to_its_uid_and_an_outsider_gets_nothing(shared_dir, daemon_factory,
                                                                  users):
    """Findings 3 and 5: with the default policy another uid cannot read, write, delete,
    squat or stall a channel, and cannot see it in ls.  The daemon starts with umask 000, under
    which the old build made every ring 0666."""
    old = os.umask(0)
    try:
        d = daemon_factory(directory=shared_dir)
    finally:
        os.umask(old)
    a, out = users["shimmy-a"], users["shimmy-out"]
    assert client("shimmy-a", d.socket, "create", "a/private")["ok"]
    sub = subprocess.Popen(uids.command_as("shimmy-a", CLIENT, d.socket, "subscribe", "a/private",
                                           "1"), stdout=subprocess.PIPE, text=True)
    try:
        assert '"ready"' in sub.stdout.readline()
        found = objects(d)
        assert found, "the ring and a semaphore exist"
        for entry, st in found.items():
            assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (a["uid"], 0o600), entry
        assert_nothing_for_others(d)
        shm = "/" + next(e for e in found if not e.startswith("sem."))
        # The kernel refuses the outsider the memory itself ...
        raw = client("shimmy-out", d.socket, "raw_open", shm)
        assert raw["error"] == "PermissionsError"
        # ... and the daemon refuses every operation, naming uid, channel and rule.
        for action in ("create", "publish", "subscribe", "delete"):
            got = client("shimmy-out", d.socket, action, "a/private", "1")
            assert got["error"] == "PermissionDenied", (action, got)
            assert f"uid {out['uid']}" in got["message"] and "'a/private'" in got["message"]
            assert f"belongs to uid {a['uid']}" in got["message"]
        listing = client("shimmy-out", d.socket, "list", "-")
        assert "a/private" not in listing["names"] and listing["hidden"] == 1
        # The owner is not held back: it still publishes and its subscriber receives.
        assert client("shimmy-a", d.socket, "publish", "a/private", "1")["ok"]
        assert "m0" in sub.stdout.readline()
    finally:
        sub.kill()
        sub.wait()
    # Streams follow the same rule: the outsider cannot take the reader end of a's stream.
    writer = subprocess.Popen(uids.command_as("shimmy-a", CLIENT, d.socket, "stream_writer",
                                              "a/pipe"), stdout=subprocess.PIPE,
                              stdin=subprocess.PIPE, text=True)
    try:
        assert '"ready"' in writer.stdout.readline()
        got = client("shimmy-out", d.socket, "stream_reader", "a/pipe")
        assert got["error"] == "PermissionDenied" and "stream 'a/pipe'" in got["message"], got
    finally:
        writer.stdin.close()
        writer.wait(10)
    # The outsider's own channel is its own.
    assert client("shimmy-out", d.socket, "create", "out/mine")["ok"]
    assert client("shimmy-a", d.socket, "delete", "out/mine")["error"] == "PermissionDenied"
    assert client("shimmy-out", d.socket, "delete", "out/mine")["ok"]


def test_two_uids_in_one_group_share_and_an_outsider_is_refused(shared_dir, daemon_factory,
                                                               users):
    """The recipe of docs/security.md: channel_group = a group both apps' uids are in."""
    d = daemon_factory("--config", _config(shared_dir, f'channel_group = "{uids.SHARED_GROUP}"'),
                       directory=shared_dir)
    gid = grp.getgrnam(uids.SHARED_GROUP).gr_gid
    assert client("shimmy-a", d.socket, "create", "team/feed")["ok"]
    sub = subprocess.Popen(uids.command_as("shimmy-b", CLIENT, d.socket, "subscribe", "team/feed",
                                           "3"), stdout=subprocess.PIPE, text=True)
    try:
        assert '"ready"' in sub.stdout.readline()
        assert client("shimmy-a", d.socket, "publish", "team/feed", "3")["ok"]
        got = sub.stdout.readline()
        assert '"got": ["m0", "m1", "m2"]' in got, got
    finally:
        sub.kill()
        sub.wait()
    for entry, st in objects(d).items():
        assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (gid, 0o660), entry
    assert_nothing_for_others(d)
    refused = client("shimmy-out", d.socket, "subscribe", "team/feed", "1")
    assert refused["error"] == "PermissionDenied"
    assert f"members of group {gid}" in refused["message"]


def test_a_rule_reserves_names_and_the_sdk_explains_a_kernel_refusal(shared_dir, daemon_factory,
                                                                     users):
    """owner= keeps other uids from squatting a name; ops= limits what the rule grants (no
    squatting the publisher role); a rule granting a uid that the objects' mode does not let in
    gives PermissionDenied with the path and the remedy, not a raw posix_ipc traceback."""
    rules = ('channel_rules = ["feeds/** owner=shimmy-a gid=shimmy-share ops=subscribe", '
             '"raw/** uid=shimmy-out"]')
    d = daemon_factory("--config", _config(shared_dir, rules), directory=shared_dir)
    squat = client("shimmy-b", d.socket, "create", "feeds/prices")
    assert squat["error"] == "PermissionDenied" and "reserves it for uid" in squat["message"]
    assert client("shimmy-a", d.socket, "create", "feeds/prices")["ok"]
    pub = client("shimmy-b", d.socket, "publish", "feeds/prices", "1")
    assert pub["error"] == "PermissionDenied" and "may not publish" in pub["message"], pub
    sub = client("shimmy-b", d.socket, "subscribe", "feeds/prices", "1")
    assert sub["error"] == "ReceiveTimeout", sub    # subscribed; nobody published
    outsider = client("shimmy-out", d.socket, "subscribe", "feeds/prices", "1")
    assert outsider["error"] == "PermissionDenied" and "may not" in outsider["message"]
    # The daemon lets shimmy-out open raw/x, but the ring is 0600 shimmy-a's: the kernel says
    # no, and the SDK says why and what to do.
    assert client("shimmy-a", d.socket, "create", "raw/x")["ok"]
    refused = client("shimmy-out", d.socket, "create", "raw/x")
    assert refused["error"] == "PermissionDenied" and refused["shimmy"], refused
    assert "/dev/shm/shimmy." in refused["message"] and "mode 0600" in refused["message"]
    assert "channel_group" in refused["message"]


def test_only_the_owner_or_root_deletes_a_stream(shared_dir, daemon_factory, users):
    """delete of a stream (shimmy rm) follows the channel rule: another uid is refused, naming
    the owner; the owner and root may; the writer still attached is not hurt by the refusal."""
    from shimmy.sdk.client import get_client
    d = daemon_factory(directory=shared_dir)
    a, out = users["shimmy-a"], users["shimmy-out"]

    def hold(name: str) -> subprocess.Popen:
        w = subprocess.Popen(uids.command_as("shimmy-a", CLIENT, d.socket, "stream_writer", name),
                             stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True)
        assert '"ready"' in w.stdout.readline()
        return w

    def streams() -> set[str]:
        return {s["name"] for s in get_client(d.socket).request("stat")["streams"]}

    writers = [hold("a/pipe1"), hold("a/pipe2")]
    try:
        got = client("shimmy-out", d.socket, "delete", "a/pipe1")
        assert got["error"] == "PermissionDenied", got
        assert f"uid {out['uid']}" in got["message"] and "delete stream 'a/pipe1'" in got["message"]
        assert f"belongs to uid {a['uid']}" in got["message"]
        assert streams() == {"a/pipe1", "a/pipe2"}
        assert client("shimmy-a", d.socket, "delete", "a/pipe1")["ok"]       # the owner
        get_client(d.socket).request("delete", name="a/pipe2", kind="stream")  # root
        assert streams() == set()
    finally:
        for w in writers:
            w.stdin.close()
            assert w.wait(10) == 0


def test_daemon_and_apps_as_one_unprivileged_uid(users, shared_dir):
    """The single-uid recipe: daemon and apps run as the same non-root uid; objects are 0600
    and another uid is refused with the remedy."""
    a = users["shimmy-a"]
    os.chown(shared_dir, a["uid"], a["gid"])
    sock = os.path.join(shared_dir, "shimmyd.sock")
    log = open(os.path.join(shared_dir, "daemon.log"), "w")
    code = "import sys; from shimmy.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen(uids.command_as("shimmy-a", code, "daemon", "--socket", sock),
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        while not os.path.exists(sock) and time.monotonic() < deadline:
            assert proc.poll() is None, open(log.name).read()
            time.sleep(0.05)
        while "daemon ready" not in open(log.name).read() and time.monotonic() < deadline:
            time.sleep(0.05)
        made = client("shimmy-a", sock, "create", "solo/x")
        assert made["ok"], (made, open(log.name).read())
        shm = [e for e in os.listdir("/dev/shm") if e.startswith("shimmy.")
               and os.stat(os.path.join("/dev/shm", e)).st_uid == a["uid"]]
        assert shm and all(stat.S_IMODE(os.stat("/dev/shm/" + e).st_mode) == 0o600 for e in shm)
        other = client("shimmy-b", sock, "create", "b/x")
        assert other["error"] == "PermissionDenied" and "channel_group" in other["message"]
        assert stat.S_IMODE(os.stat(sock + ".lock").st_mode) == 0o600
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
        log.close()
    assert proc.returncode == 0


def test_another_uid_cannot_hold_the_lock_file(shared_dir, daemon_factory, users):
    """Finding 5: the lock file was 0644, so any user could flock it and stop the daemon from
    restarting.  Now it is 0600, and one planted by another uid is replaced."""
    d = daemon_factory(directory=shared_dir)
    lock = d.socket + ".lock"
    assert stat.S_IMODE(os.stat(lock).st_mode) == 0o600
    hold = ("import fcntl, json, sys, time\n"
            "try:\n fh = open(sys.argv[1]); fcntl.flock(fh, fcntl.LOCK_SH)\n"
            " print(json.dumps({'ok': True}), flush=True); time.sleep(30)\n"
            "except OSError as e:\n print(json.dumps({'ok': False, 'error': str(e)}))\n")
    assert not uids.run_as("shimmy-out", hold, lock)["ok"]
    d.stop()
    # Plant a lock file owned by the outsider and have it hold the lock.
    with open(lock, "w"):
        pass
    out = users["shimmy-out"]
    os.chown(lock, out["uid"], out["gid"])
    os.chmod(lock, 0o644)
    holder = subprocess.Popen(uids.command_as("shimmy-out", hold, lock), stdout=subprocess.PIPE,
                              text=True)
    try:
        assert '"ok": true' in holder.stdout.readline()
        d.start()
        assert "belongs to another uid" in d.log()
        assert os.stat(lock).st_uid == os.geteuid()
    finally:
        holder.kill()
        holder.wait()


def _config(directory: str, *lines: str) -> str:
    path = os.path.join(directory, "shimmy.toml")
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return path
