"""RDMA transport logic that needs no device (runs on every host), and the transport choice on a
host without RDMA: ``transport=rdma`` is a startup error naming the reason, ``auto`` runs TCP and
says why on every mirror."""

from __future__ import annotations

import os
import resource
import subprocess
import sys

import pytest
from test_peer_mirror import HAVE_NS, check, cluster, free_port, run_stream  # noqa: F401

from shimmy.daemon.config import Settings
from shimmy.daemon.peer import rdma

CAP = 1 << 16


def test_range_is_one_piece_unless_it_wraps():
    assert rdma.split_range(0, 100, CAP) == [(0, 100)]
    assert rdma.split_range(CAP - 100, 100, CAP) == [(CAP - 100, 100)]        # ends at the wrap
    assert rdma.split_range(5 * CAP - 64, 192, CAP) == [(CAP - 64, 64), (0, 128)]
    assert rdma.split_range(3 * CAP, CAP, CAP) == [(0, CAP)]


def test_small_ranges_take_the_cpu_path():
    assert rdma.uses_cpu_path(511, 512) and not rdma.uses_cpu_path(512, 512)
    assert not rdma.uses_cpu_path(1, 0)          # threshold 0: every range is an RDMA WRITE


def test_guard_only_when_the_write_reaches_unprotected_offsets():
    assert rdma.guard_request(0, 4096, CAP, 0, None, reliable=False) is None
    assert rdma.guard_request(CAP, CAP + 100, CAP, 100, None, reliable=False) is None
    need, ahead = rdma.guard_request(CAP, CAP + 4096, CAP, 0, None, reliable=False)
    assert need == 4096 and ahead == 4096 + CAP // 4     # a quarter ring ahead
    # never past the replica's tail (the put's start) ...
    assert rdma.guard_request(CAP + 8192, 2 * CAP, CAP, 0, None, False) == (CAP, CAP + 8192)
    # ... nor, reliable, past what its subscribers consumed
    need = CAP + 4096
    assert rdma.guard_request(2 * CAP, 2 * CAP + 4096, CAP, 0, CAP + 5000, True) == \
        (need, CAP + 5000)
    assert rdma.guard_request(2 * CAP, 2 * CAP + 4096, CAP, 0, None, True) == (need, need)
    assert rdma.guard_request(2 * CAP, 2 * CAP + 4096, CAP, 0, 10, True) == (need, need)


def test_roce_v2_gid_found_by_type_ipv4_mapped_first():
    rxe = [(0, "fe80:0000:0000:0000:5054:00ff:fe12:340a", "RoCE v2"),
           (1, "0000:0000:0000:0000:0000:ffff:c612:0001", "RoCE v2")]
    assert rdma.pick_gid(rxe) == 1
    mlx = [(0, "fe80:0000:0000:0000:0000:0000:0000:0001", "IB/RoCE v1"),
           (1, "fe80:0000:0000:0000:0000:0000:0000:0001", "RoCE v2"),
           (2, "0000:0000:0000:0000:0000:ffff:0a00:0005", "IB/RoCE v1"),
           (3, "0000:0000:0000:0000:0000:ffff:0a00:0005", "RoCE v2")]
    assert rdma.pick_gid(mlx) == 3
    assert rdma.pick_gid([(0, "fe80::1", "IB/RoCE v1")]) == -1
    assert rdma.pick_gid([(0, "0000:0000:0000:0000:0000:0000:0000:0000", "RoCE v2")]) == -1


def test_memlock_error_names_the_limit_and_the_fix():
    assert rdma.memlock_problem(1 << 20, 0, 8 << 20, False) is None
    assert rdma.memlock_problem(1 << 30, 0, resource.RLIM_INFINITY, False) is None
    assert rdma.memlock_problem(1 << 30, 0, 8 << 20, True) is None       # CAP_IPC_LOCK
    msg = rdma.memlock_problem(64 << 20, 1 << 20, 8 << 20, False)
    assert "RLIMIT_MEMLOCK=8388608" in msg and "67108864 bytes" in msg
    assert "ulimit -l" in msg and "CAP_IPC_LOCK" in msg


def offer(**over):
    o = {"qpn": 17, "psn": 5, "gid": "0000:0000:0000:0000:0000:ffff:c612:0001", "mtu": 3,
         "ring_addr": 1 << 40, "ring_rkey": 99, "ring_len": 69632, "box_addr": 1 << 41,
         "box_rkey": 98, "slots": 64, "slot_size": 576, "head": 0}
    o.update(over)
    return o


def test_handshake_fields_are_validated():
    assert rdma.check_fields(offer(), rdma.OFFER_FIELDS, "rdma offer")["qpn"] == 17
    for bad, word in ((offer(qpn=-1), "'qpn'"), (offer(gid=5), "'gid'"),
                      (offer(rkey=None, ring_rkey=True), "'ring_rkey'"),
                      (offer(slot_size=100), "slot_size"), ("x", "not a map")):
        with pytest.raises(ValueError, match=word):
            rdma.check_fields(bad, rdma.OFFER_FIELDS, "rdma offer")
    o = offer()
    del o["box_addr"]
    with pytest.raises(ValueError, match="'box_addr' missing"):
        rdma.check_fields(o, rdma.OFFER_FIELDS, "rdma offer")


def test_record_fits_its_slot_header():
    assert rdma.REC.size <= rdma.REC_AREA
    buf = bytearray(rdma.REC_AREA)
    rdma.REC.pack_into(buf, 0, rdma.OP_COMMIT, 7, 1 << 40, 3, 0, 0, 0)
    assert rdma.REC.unpack_from(buf)[:3] == (rdma.OP_COMMIT, 7, 1 << 40)


def test_transport_choice():
    assert rdma.choose("tcp", True, True) == ("tcp", "transport=tcp")
    assert rdma.choose("auto", False, True)[0] == "tcp"
    assert "offered no RDMA" in rdma.choose("auto", True, False)[1]
    assert rdma.choose("auto", True, True) == ("rdma", "")
    assert rdma.choose("rdma", True, True) == ("rdma", "")


def test_completion_errors_are_named():
    assert "remote access error" in rdma.wc_error(10, "RDMA WRITE")
    assert "retry counter exceeded" in rdma.wc_error(12, "x")
    assert "QP in error state" in rdma.wc_error(5, "x")
    assert rdma.wc_error(99, "commit").startswith("commit: completion status 99")


@pytest.mark.skipif(rdma.available()[0], reason="this host has an RDMA device")
def test_settings_refuse_forced_rdma_without_a_device():
    with pytest.raises(ValueError, match="transport=rdma but RDMA is not usable here: device: "
                                         "no RDMA device"):
        Settings(transport="rdma").validate()
    with pytest.raises(ValueError, match="transport must be one of tcp, rdma, auto, got 'udp'"):
        Settings(transport="udp").validate()
    with pytest.raises(ValueError, match="rdma_small_write_threshold=5000: must be 0..4032"):
        Settings(rdma_small_write_threshold=5000).validate()
    Settings(transport="auto").validate()


@pytest.mark.skipif(rdma.available()[0], reason="this host has an RDMA device")
def test_daemon_with_forced_rdma_and_no_device_fails_at_start(tmp_path):
    conf = tmp_path / "d.toml"
    conf.write_text('transport = "rdma"\n')
    p = subprocess.run([sys.executable, "-m", "shimmy.cli", "daemon", "--socket",
                        str(tmp_path / "d.sock"), "--config", str(conf)],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p
    assert "transport=rdma but RDMA is not usable here: device: no RDMA device" in p.stderr
    assert "Traceback" not in p.stderr + p.stdout
    assert not os.path.exists(tmp_path / "d.sock")


@pytest.mark.skipif(rdma.available()[0], reason="this host has an RDMA device")
@pytest.mark.skipif(not HAVE_NS, reason="needs root, unshare and nsenter (one /dev/shm per node, "
                                        "as tests/test_peer_mirror.py)")
def test_auto_falls_back_to_tcp_and_says_why(cluster):  # noqa: F811 (fixture)
    port = free_port()
    a = cluster.node("A", "--peer-listen", f"127.0.0.1:{port}")
    b = cluster.node("B", "--peer", f"127.0.0.1:{port}")
    (result,) = run_stream(cluster, a, [b], "auto/x", "reliable", 2000)
    check(result, 2000, reliable=True)
    (mirror,) = a.peer()["mirrors"]
    assert mirror["transport"] == "tcp" and "no usable local RDMA device" in mirror["fallback"]
    peer_b = b.peer()
    (replica,) = peer_b["replicas"]
    assert replica["transport"] == {"kind": "tcp", "fallback": "no usable local RDMA device"}
    assert peer_b["counters"]["rdma_fallbacks"] >= 1 and a.peer()["counters"]["rdma_fallbacks"] >= 1
    # No device at all: one INFO line at start, no WARNING per mirror (a device that exists and
    # fails still warns every time).
    for node in (a, b):
        log = node.log()
        assert "falls back to TCP" not in log, log
        assert log.count("RDMA not used:") == 1, log
    assert peer_b["transport"] == "auto" and "no RDMA device" in peer_b["rdma"]
