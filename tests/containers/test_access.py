"""Access control across containers, on the real engine with real uids:

- container labels: peer credentials -> /proc/<pid>/cgroup -> docker labels (shimmy.publish /
  shimmy.subscribe) -> allow, or PermissionDenied naming the rule; ``access closed`` refuses
  containers without labels;
- ownership (the default ``access owner``, docs/security.md) with ``channel_group``, the recipe of
  docs/containers.md: two app uids in the group share a channel, an outsider uid without the
  group is refused by the daemon (PermissionDenied naming its uid, the channel and the rule) and
  by the kernel (the ring is 0660), and everything the daemon made is group 10001, never
  other-readable; without ``channel_group`` a non-root daemon refuses other uids and says so.
"""

from __future__ import annotations

import json

import pytest

from ctrkit import APP_IMAGE, Containers, docker, wait_until

pytestmark = pytest.mark.container

ATTEMPTS = """
import json, shimmy
def attempt(op, name):
    try:
        with shimmy.Channel(name) as ch:
            if op == "publish":
                ch.publish(b"x")
            else:
                ch.subscribe().close()
        return "ok"
    except shimmy.PermissionDenied as exc:
        assert isinstance(exc, PermissionError)
        return "denied: " + str(exc)
out = {f"{op} {name}": attempt(op, name)
       for op, name in [("publish", "allowed/a"), ("subscribe", "allowed/a"),
                        ("publish", "secret/a"), ("subscribe", "secret/a"),
                        ("subscribe", "allowed/deep/b"), ("publish", "allowed/deep/b")]}
print("RESULT " + json.dumps(out), flush=True)
"""


def run_attempts(containers, daemon, role, labels=None) -> tuple[str, dict]:
    name = containers.run(role, APP_IMAGE, "python", "-c", ATTEMPTS, labels=labels,
                          opts=("--ipc", f"container:{daemon}"))
    assert containers.wait_exit(name, 60) == 0, containers.logs(name)
    line = [ln for ln in containers.logs(name).splitlines() if ln.startswith("RESULT ")]
    assert line, containers.logs(name)
    cid = docker("inspect", "-f", "{{.Id}}", name).stdout.strip()
    return cid, json.loads(line[-1][len("RESULT "):])


def require_identity(containers, daemon):
    """Skip (with the reason) when the daemon under test does not map clients to containers."""
    probe = containers.app("probe", daemon, "compose_subscriber.py",
                           {"SHIMMY_CHANNEL": "probe/x", "SHIMMY_COUNT": "1",
                            "SHIMMY_RECEIVE_TIMEOUT": "30", "SHIMMY_TIMEOUT": "30"})
    probe_id = docker("inspect", "-f", "{{.Id}}", probe).stdout.strip()

    def clients():
        st = containers.stat(daemon)
        return [c for c in st.get("clients", []) if c.get("connected", True)] \
            if any(ch["name"] == "probe/x" and ch["subscribers"] for ch in st["channels"]) \
            else None

    found = wait_until(clients, 30, 0.3, "probe subscribed")
    docker("rm", "-f", probe, check=False)
    if not any(c.get("container") == probe_id for c in found):
        pytest.skip("the daemon does not map clients to containers yet (clients in stat: "
                    f"{found}); needs shimmy.daemon.identity wired into the daemon")


def test_labels_allow_and_refuse_channel_ops(containers):
    daemon = containers.daemon()   # access owner; the apps run as the daemon's uid (10001)
    require_identity(containers, daemon)

    cid, got = run_attempts(containers, daemon, "labelled",
                            labels={"shimmy.publish": "allowed/*",
                                    "shimmy.subscribe": "allowed/**"})
    assert got["publish allowed/a"] == "ok"
    assert got["subscribe allowed/a"] == "ok"
    assert got["subscribe allowed/deep/b"] == "ok"             # ** crosses '/'
    # may subscribe but not publish (* stays in one segment): refused at publish, by that rule
    msg = got["publish allowed/deep/b"]
    assert msg.startswith("denied: "), got
    assert cid[:12] in msg and "may not publish channel 'allowed/deep/b'" in msg, msg
    assert "shimmy.publish='allowed/*'" in msg, msg
    # neither op allowed: refused when opening the channel, naming both rules
    for op in ("publish", "subscribe"):
        msg = got[f"{op} secret/a"]
        assert msg.startswith("denied: "), got
        assert cid[:12] in msg and "'secret/a'" in msg, msg
        assert "shimmy.publish='allowed/*'" in msg and "shimmy.subscribe='allowed/**'" in msg, msg

    # a container without shimmy.* policy labels: labels do not narrow it (access owner), and
    # the channels are its uid's
    _, got = run_attempts(containers, daemon, "unlabelled", labels={"shimmy.ci": "1"})
    assert set(got.values()) == {"ok"}, got


def test_closed_access_refuses_unlabelled_containers(containers):
    daemon = containers.daemon("--access", "closed")
    cid, got = run_attempts(containers, daemon, "unlabelled", labels={"shimmy.ci": "1"})
    for key, value in got.items():
        assert value.startswith("denied: ") and "--access closed" in value, (key, value)
        assert cid[:12] in value, (key, value)
    _, got = run_attempts(containers, daemon, "labelled",
                          labels={"shimmy.publish": "allowed/*", "shimmy.subscribe": "allowed/*"})
    assert got["publish allowed/a"] == "ok" and got["subscribe allowed/a"] == "ok"
    assert got["publish secret/a"].startswith("denied: ")


# -- ownership and channel_group: the recipe of docs/containers.md ----------------------------

SUBSCRIBER = """
import json, shimmy, sys
with shimmy.Channel(sys.argv[1]) as ch:
    sub = ch.subscribe()
    print("READY", flush=True)
    got = [sub.receive_bytes(timeout=60).decode() for _ in range(3)]
print("RESULT " + json.dumps(got), flush=True)
"""

PUBLISHER = """
import json, shimmy, sys
with shimmy.Channel(sys.argv[1]) as ch:
    for i in range(3):
        ch.publish(f"m{i}".encode())
print("RESULT " + json.dumps("ok"), flush=True)
"""

OUTSIDER = """
import json, os, shimmy, sys
out = {}
try:
    with shimmy.Channel(sys.argv[1]) as ch:
        ch.subscribe().close()
    out["channel"] = "ALLOWED"
except shimmy.PermissionDenied as exc:
    out["channel"] = "denied: " + str(exc)
try:
    os.open("/dev/shm/" + sys.argv[2], os.O_RDONLY)
    out["ring"] = "ALLOWED"
except OSError as exc:
    out["ring"] = f"{type(exc).__name__}: {exc}"
print("RESULT " + json.dumps(out), flush=True)
"""

MODES = """
import json, os
print(json.dumps({p: [os.lstat(p).st_mode & 0o7777, os.lstat(p).st_uid, os.lstat(p).st_gid]
                  for d in ("/dev/shm", "/run/shimmy")
                  for p in (os.path.join(d, n) for n in os.listdir(d))}))
"""


def as_user(user: str, *groups: str) -> tuple[str, ...]:
    return ("--user", user, *(a for g in groups for a in ("--group-add", g)))


def start_script(containers: Containers, daemon: str, role: str, code: str, user: tuple[str, ...],
                 *args: str) -> str:
    return containers.run(role, APP_IMAGE, "python", "-c", code, *args,
                          opts=(*user, "--read-only", "--cap-drop", "ALL",
                                "--ipc", f"container:{daemon}"))


def result(containers: Containers, name: str, timeout: float = 90):
    assert containers.wait_exit(name, timeout) == 0, containers.logs(name)
    line = [ln for ln in containers.logs(name).splitlines() if ln.startswith("RESULT ")]
    assert line, containers.logs(name)
    return json.loads(line[-1][len("RESULT "):])


def daemon_modes(daemon: str) -> dict[str, tuple[int, int, int]]:
    out = docker("exec", daemon, "python3", "-c", MODES).stdout
    return {k: (v[0], v[1], v[2]) for k, v in json.loads(out).items()}


def test_channel_group_two_uids_share_an_outsider_is_refused_nothing_is_other_readable(
        containers):
    """The compose/Kubernetes recipe: daemon uid 10001 with channel_group 10001 (the owner
    policy stays the default); uid 10002 creates and subscribes, uid 10003 publishes, both with
    group 10001 added; uid 10004 without the group is refused by the daemon and the kernel.
    The sockets stay 0666 here so the outsider reaches the daemon and its refusal is what is
    tested (the compose file also sets socket_mode 0660; test_compose_e2e.py checks that)."""
    daemon = containers.daemon("--channel-group", "10001")
    sub = start_script(containers, daemon, "uid10002", SUBSCRIBER, as_user("10002:10002", "10001"),
                       "team/a")
    wait_until(lambda: "READY" in containers.logs(sub) or not containers.running(sub), 60, 0.25,
               "subscriber subscribed")
    assert containers.running(sub), containers.logs(sub)
    (ch,) = [c for c in containers.stat(daemon)["channels"] if c["name"] == "team/a"]
    shm_name = ch["shm"].lstrip("/")

    # everything the daemon made, while a subscriber holds its slot: group 10001, no other bits
    modes = daemon_modes(daemon)
    assert modes[f"/dev/shm/{shm_name}"] == (0o660, 10001, 10001), modes
    sems = {k: v for k, v in modes.items() if k.startswith(f"/dev/shm/sem.{shm_name}")}
    assert sems and set(sems.values()) == {(0o660, 10001, 10001)}, sems
    assert modes["/run/shimmy/shimmyd.sock.lock"][0] == 0o600, modes
    daemon_made = {k: v for k, v in modes.items() if v[1] == 10001}
    assert not [k for k, v in daemon_made.items()
                if v[0] & 0o007 and not k.startswith("/run/shimmy/shimmyd.sock")], daemon_made

    outsider = start_script(containers, daemon, "uid10004", OUTSIDER, as_user("10004:10004"),
                            "team/a", shm_name)
    got = result(containers, outsider)
    msg = got["channel"]
    assert msg.startswith("denied: uid 10004 "), got
    assert "'team/a'" in msg and "belongs to uid 10002 or members of group 10001" in msg, got
    assert got["ring"].startswith("PermissionError: "), got

    pub = start_script(containers, daemon, "uid10003", PUBLISHER, as_user("10003:10003", "10001"),
                       "team/a")
    assert result(containers, pub) == "ok"
    assert result(containers, sub) == ["m0", "m1", "m2"]


def test_without_channel_group_a_non_root_daemon_refuses_other_uids(containers):
    """The failure an operator meets who forgets channel_group: the daemon (uid 10001, not root)
    cannot give a channel's memory to uid 10002, refuses, and names the setting."""
    daemon = containers.daemon()
    name = start_script(containers, daemon, "uid10002", OUTSIDER, as_user("10002:10002", "10001"),
                        "team/b", "nothing")
    got = result(containers, name)
    msg = got["channel"]
    assert msg.startswith("denied: uid 10002 ") and "'team/b'" in msg, got
    assert "set channel_group" in msg, got
    assert not [c for c in containers.stat(daemon)["channels"] if c["name"] == "team/b"]
