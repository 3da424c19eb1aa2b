"""Container identity, the container engine's labels and the label policy (shimmy.daemon.identity,
containers, label_policy).

The cgroup files below are real shapes, copied from processes in containers on cgroup v1 and v2
hosts with the docker, containerd and CRI-O runtimes; they are written to a fake /proc in a temp
dir and read through the real code.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from shimmy.daemon import containers
from shimmy.daemon.containers import (
    DockerLabelSource,
    LabelSource,
    StaticLabelSource,
    watch_container_deaths,
)
from shimmy.daemon.identity import (
    container_id_from_cgroup,
    container_id_of_pid,
    peer_credentials,
)
from shimmy.daemon.label_policy import LabelPolicy, compile_pattern, policy_for_pid
from shimmy.errors import InvalidArgument, PermissionDenied

CID = "3f2a9c1d7e4b5a6f8091a2b3c4d5e6f708192a3b4c5d6e7f8091a2b3c4d5e6f7"
CID2 = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"

DOCKER_V1_CGROUPFS = f"""\
12:pids:/docker/{CID}
11:hugetlb:/docker/{CID}
10:net_cls,net_prio:/docker/{CID}
9:name=systemd:/docker/{CID}
8:cpu,cpuacct:/docker/{CID}
7:memory:/docker/{CID}
0::/system.slice/containerd.service
"""
DOCKER_V2_SYSTEMD = f"0::/system.slice/docker-{CID}.scope\n"
# cgroup v2 seen from a reader in another cgroup namespace (daemon in its own container)
DOCKER_V2_DOTDOT = f"0::/../../system.slice/docker-{CID}.scope\n"
CONTAINERD_K8S = (f"0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1b2c3d4e_"
                  f"aaaa_bbbb_cccc_111122223333.slice/cri-containerd-{CID}.scope\n")
CRIO = (f"0::/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod0d1e.slice/"
        f"crio-{CID}.scope\n")
CRIO_V1 = f"4:memory:/kubepods/besteffort/pod0d1e2f3a-1111-2222-3333-444455556666/crio-{CID}\n"
KUBEPODS_CGROUPFS = f"3:cpu:/kubepods/burstable/pod0d1e2f3a-1111-2222-3333-444455556666/{CID}\n"
DIND = f"0::/docker/{CID2}/docker/{CID}\n"
HOST_V1 = "12:pids:/user.slice/user-0.slice/session-1.scope\n0::/user.slice\n"
HOST_V2 = "0::/init.scope\n"
NOT_HEX = "0::/system.slice/docker-xyz.scope\n"
SHORT_ID = f"0::/docker/{CID[:63]}\n"


@pytest.fixture
def proc(tmp_path):
    """A fake /proc: write(pid, text) makes <tmp>/<pid>/cgroup."""
    root = tmp_path / "proc"
    root.mkdir()

    def write(pid: int, text: str) -> None:
        d = root / str(pid)
        d.mkdir(exist_ok=True)
        (d / "cgroup").write_text(text)

    write.root = str(root)  # type: ignore[attr-defined]
    return write


@pytest.mark.parametrize("text", [DOCKER_V1_CGROUPFS, DOCKER_V2_SYSTEMD, DOCKER_V2_DOTDOT,
                                  CONTAINERD_K8S, CRIO, CRIO_V1, KUBEPODS_CGROUPFS, DIND],
                         ids=["docker-v1-cgroupfs", "docker-v2-systemd", "docker-v2-dotdot",
                              "containerd-k8s", "crio", "crio-v1", "kubepods-cgroupfs", "dind"])
def test_container_id_from_real_cgroup_files(proc, text):
    proc(4242, text)
    assert container_id_of_pid(4242, proc_root=proc.root) == CID


@pytest.mark.parametrize("text", [HOST_V1, HOST_V2, NOT_HEX, SHORT_ID, "", "garbage\n"])
def test_host_processes_and_malformed_files_have_no_container(proc, text):
    proc(7, text)
    assert container_id_of_pid(7, proc_root=proc.root) is None


def test_missing_pid_and_bad_pids_are_none(proc):
    assert container_id_of_pid(999999, proc_root=proc.root) is None
    assert container_id_of_pid(0, proc_root=proc.root) is None
    assert container_id_of_pid(-3, proc_root=proc.root) is None


def test_unreadable_cgroup_is_none(proc, tmp_path):
    d = tmp_path / "proc" / "55"
    d.mkdir()
    (d / "cgroup").mkdir()  # a directory where the file should be: open() fails with OSError
    assert container_id_of_pid(55, proc_root=proc.root) is None


def test_innermost_container_wins_in_docker_in_docker():
    assert container_id_from_cgroup(DIND) == CID


def test_own_process_on_this_host():
    # The test process itself: whatever the machine, the real /proc must parse without error.
    got = container_id_of_pid(os.getpid())
    assert got is None or len(got) == 64


# ---- peer credentials -----------------------------------------------------------------------


def test_peer_credentials_of_a_real_unix_socket():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        pid, uid, gid = peer_credentials(a)
    assert (pid, uid, gid) == (os.getpid(), os.getuid(), os.getgid())


# ---- patterns -------------------------------------------------------------------------------


@pytest.mark.parametrize("pattern,name,want", [
    ("sensors/*", "sensors/temp", True),
    ("sensors/*", "sensors/a/b", False),
    ("sensors/*", "sensors", False),
    ("sensors/*", "sensorsX/temp", False),
    ("sensors/**", "sensors/temp", True),
    ("sensors/**", "sensors/a/b/c", True),
    ("sensors/**", "sensors", False),
    ("**", "anything/at/all", True),
    ("*", "top", True),
    ("*", "a/b", False),
    ("*/temp", "room1/temp", True),
    ("*/temp", "a/room1/temp", False),
    ("**/temp", "a/room1/temp", True),
    ("cam?", "cam0", True),
    ("cam?", "cam10", False),
    ("cam[0-3]", "cam2", True),
    ("cam[0-3]", "cam7", False),
    ("cam[!0-3]", "cam7", True),
    ("a[/]b", "a/b", False),
    ("a.b", "aXb", False),           # '.' is literal, not a regex dot
    ("video/cam0", "video/cam0", True),
    ("video/cam0", "video/cam01", False),
    ("x[", "x[", True),              # unclosed bracket is literal
])
def test_pattern_semantics(pattern, name, want):
    assert bool(compile_pattern(pattern).match(name)) is want


# ---- policy ---------------------------------------------------------------------------------


def test_labelled_container_gets_exactly_what_its_labels_list():
    p = LabelPolicy.from_labels("container abc", {"shimmy.publish": "sensors/*, logs/**",
                                                   "shimmy.subscribe": "cmd/*"},
                                 default_open=True)
    p.check("publish", "sensors/temp")
    p.check("publish", "logs/a/b")
    p.check("subscribe", "cmd/stop")
    with pytest.raises(PermissionDenied) as e:
        p.check("publish", "cmd/stop")
    msg = str(e.value)
    assert "container abc" in msg and "publish" in msg and "'cmd/stop'" in msg
    assert "shimmy.publish='sensors/*, logs/**'" in msg
    with pytest.raises(PermissionError):  # PermissionDenied is a PermissionError
        p.check("subscribe", "sensors/temp")


def test_open_needs_either_op_and_names_both_rules():
    p = LabelPolicy.from_labels("container abc", {"shimmy.publish": "a/*",
                                                   "shimmy.subscribe": "b/*"},
                                 default_open=False)
    p.check_open("a/x")
    p.check_open("b/x")
    with pytest.raises(PermissionDenied) as e:
        p.check_open("c/x")
    msg = str(e.value)
    assert msg.startswith("container abc may not open channel 'c/x'")
    assert "shimmy.publish='a/*'" in msg and "shimmy.subscribe='b/*'" in msg
    LabelPolicy.allow_all("host").check_open("anything")
    with pytest.raises(PermissionDenied, match="closed"):
        LabelPolicy.deny_all("c", "--access closed").check_open("x")


def test_one_label_means_the_other_op_is_refused_even_when_open():
    p = LabelPolicy.from_labels("container abc", {"shimmy.subscribe": "sensors/*"},
                                 default_open=True)
    p.check("subscribe", "sensors/temp")
    with pytest.raises(PermissionDenied, match=r"no shimmy.publish label"):
        p.check("publish", "sensors/temp")


def test_empty_label_grants_nothing():
    p = LabelPolicy.from_labels("container abc", {"shimmy.publish": ""}, default_open=True)
    with pytest.raises(PermissionDenied, match=r"shimmy.publish=''"):
        p.check("publish", "a")


def test_unlabelled_container_follows_the_default():
    other = {"shimmy.ci": "1", "com.docker.compose.service": "web"}  # not policy labels
    LabelPolicy.from_labels("c", other, default_open=True).check("publish", "x/y")
    with pytest.raises(PermissionDenied, match=r"no shimmy.publish or shimmy.subscribe label.*"
                                               r"--access closed"):
        LabelPolicy.from_labels("c", other, default_open=False).check("subscribe", "x/y")
    with pytest.raises(PermissionDenied, match=r"labels unavailable"):
        LabelPolicy.from_labels("c", None, default_open=False).check("publish", "x")


def test_unknown_op_is_an_argument_error():
    with pytest.raises(InvalidArgument, match="unknown channel operation 'delete'"):
        LabelPolicy.allow_all("c").check("delete", "x")


def test_describe_is_jsonable():
    import json
    p = LabelPolicy.from_labels("c", {"shimmy.publish": "a/*"}, default_open=True,
                                 container_id=CID)
    d = json.loads(json.dumps(p.describe()))
    assert d["rules"] == {"publish": ["a/*"]} and d["default"] == "deny"


# ---- policy_for_pid: the whole chain with real files and a real label source ---------------


class DictLabels:
    """A tiny in-memory LabelSource (a real implementation of the protocol, without name())."""

    def __init__(self, table):
        self.table = table
        self.calls = 0

    def labels(self, container_id):
        self.calls += 1
        return self.table.get(container_id)


def test_label_sources_implement_the_protocol():
    assert isinstance(DictLabels({}), LabelSource)
    assert isinstance(StaticLabelSource(), LabelSource)
    assert isinstance(DockerLabelSource(), LabelSource)


def test_policy_for_pid_chain(proc):
    proc(100, DOCKER_V2_SYSTEMD)          # labelled container
    proc(101, CONTAINERD_K8S.replace(CID, CID2))  # container without labels
    proc(102, HOST_V2)                    # host process
    src = StaticLabelSource({CID: {"shimmy.publish": "sensors/*"}, CID2: {}},
                            names={CID: "shimmy-pub-1"})

    p = policy_for_pid(100, src, default_open=True, proc_root=proc.root)
    p.check("publish", "sensors/temp")
    with pytest.raises(PermissionDenied) as e:
        p.check("publish", "secret/plans")
    assert f"container {CID[:12]} (shimmy-pub-1)" in str(e.value)
    assert "shimmy.publish='sensors/*'" in str(e.value)
    assert p.container_id == CID

    policy_for_pid(101, src, default_open=True, proc_root=proc.root).check("publish", "a")
    with pytest.raises(PermissionDenied, match=f"container {CID2[:12]} may not publish"):
        policy_for_pid(101, src, default_open=False, proc_root=proc.root).check("publish", "a")

    policy_for_pid(102, src, default_open=True, proc_root=proc.root).check("subscribe", "a")
    with pytest.raises(PermissionDenied, match=r"process 102 \(outside any container\)"):
        policy_for_pid(102, src, default_open=False, proc_root=proc.root).check("subscribe", "a")


def test_policy_for_unidentified_pids(proc):
    src = DictLabels({})
    for pid in (None, 0):
        policy_for_pid(pid, src, default_open=True, proc_root=proc.root).check("publish", "a")
        with pytest.raises(PermissionDenied, match="hostPID"):
            policy_for_pid(pid, src, default_open=False, proc_root=proc.root).check("publish", "a")
    with pytest.raises(PermissionDenied, match="does not exist"):
        policy_for_pid(31337, src, default_open=False, proc_root=proc.root).check("publish", "a")
    assert src.calls == 0


def test_a_failing_label_source_does_not_break_the_daemon(proc):
    proc(100, DOCKER_V2_SYSTEMD)

    class Broken:
        def labels(self, container_id):
            raise RuntimeError("engine exploded")

    policy_for_pid(100, Broken(), default_open=True, proc_root=proc.root).check("publish", "a")
    with pytest.raises(PermissionDenied, match="labels unavailable"):
        policy_for_pid(100, Broken(), default_open=False, proc_root=proc.root).check("publish", "a")


# ---- docker-backed parts without an engine: they must degrade, not raise ---------------------


def _no_engine_url(tmp_path):
    return f"unix://{tmp_path}/no-such-docker.sock"


def test_docker_label_source_without_engine_returns_none_quickly(tmp_path):
    src = DockerLabelSource(base_url=_no_engine_url(tmp_path), ttl=60, timeout=1)
    t0 = time.monotonic()
    assert src.labels(CID) is None
    assert src.labels(CID) is None      # cached failure: no second connect attempt
    assert src.name(CID) is None
    assert time.monotonic() - t0 < 5


def test_watch_container_deaths_stops_without_engine(tmp_path):
    stop = threading.Event()
    seen = []
    t = threading.Thread(target=watch_container_deaths,
                         kwargs=dict(callback=seen.append, stop_event=stop,
                                     base_url=_no_engine_url(tmp_path), poll=0.2, retry=0.2),
                         daemon=True)
    t.start()
    time.sleep(0.5)
    assert t.is_alive()                 # retrying, not crashed
    stop.set()
    t.join(5)
    assert not t.is_alive() and seen == []


def test_containers_module_imports_no_docker_eagerly():
    assert containers.DockerLabelSource  # the module is loaded
    # importing it must not have required docker: the SDK is imported when first used
    assert "docker" not in containers.__dict__
