"""Readers and publishers that cannot be fooled (issue 8, findings 6 and 7).

Each test plays a client that has write access to a ring and stores garbage into it (the test
process maps the real ring of a real daemon and writes the words itself); the reader or
publisher must raise RingCorrupted naming the channel and the offset, never hand out a frame
beyond the channel's limits, a `lost` near 1e19, a struct.error or an IndexError, and the
daemon's listing must keep working for every other channel.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

import shimmy
from shimmy import ring
from shimmy.errors import RingCorrupted
from shimmy.sdk.client import get_client

from tests.chaos import payloads

CAP = 4096


def _filled(daemon, name: str, n: int = 10, mode: str = "reliable"):
    ch = shimmy.Channel(name, daemon=daemon.socket, mode=mode, capacity=CAP)
    sub = ch.subscribe()
    for seq in range(n):
        ch.publish(payloads.make(seq, 100))
    return ch, sub


def _frame_at(ch, position: int) -> int:
    return ch._view.data_offset + (position & (CAP - 1))


@pytest.mark.parametrize("garbage, what", [
    ((0xFFFF_FFF0, 0, 0), "length 4294967280 exceeds the largest message 2032"),
    ((64, 0x5A5A, 0), "bad frame header"),
    ((8, ring.FLAG_PAD, 0), "bad frame header"),                 # a PAD of unaligned length
    ((CAP * 4, ring.FLAG_PAD, 0), "past"),                         # a PAD beyond the tail
    ((32, 0, 2**63 + 5), "has seq 9223372036854775813"),          # finding 6: lost ~ 1e19
])
@pytest.mark.parametrize("copy_path", [False, True])
def test_garbage_frame_header_raises_ring_corrupted(daemon, garbage, what, copy_path):
    ch, sub = _filled(daemon, "victim")
    sub.receive(timeout=1)                       # seq 0 is fine
    pos = sub._reader.position
    ring.FRAME.pack_into(ch._view.mv, _frame_at(ch, pos), *garbage)
    with pytest.raises(RingCorrupted) as info:
        sub.receive_bytes(timeout=1) if copy_path else sub.receive(timeout=1)
    text = str(info.value)
    assert "channel 'victim' is corrupted" in text and what in text
    assert f"segment offset {_frame_at(ch, pos)}" in text
    ch.close()


def test_sequence_going_backwards_is_corruption_not_loss(daemon):
    ch, sub = _filled(daemon, "victim")
    for _ in range(3):
        sub.receive(timeout=1)
    pos = sub._reader.position
    length, flags, _ = ring.FRAME.unpack_from(ch._view.mv, _frame_at(ch, pos))
    ring.FRAME.pack_into(ch._view.mv, _frame_at(ch, pos), length, flags, 1)
    with pytest.raises(RingCorrupted, match="has seq 1, expected 3"):
        sub.receive(timeout=1)
    ch.close()


@pytest.mark.parametrize("word, value, what", [
    (ring.W_HEAD, 2**60, "head 1152921504606846976 is unaligned or past the tail"),
    (ring.W_TAIL, 8, "tail 8 is behind"),
    (ring.W_TAIL, 2**40 + 3, "unaligned"),
])
def test_garbage_head_or_tail_raises_ring_corrupted(daemon, word, value, what):
    ch, sub = _filled(daemon, "victim")
    sub.receive(timeout=1)
    ch._view.q[word] = value
    with pytest.raises(RingCorrupted, match=what):
        for _ in range(20):
            sub.receive(timeout=0.2)
    ch.close()


def test_random_garbage_in_the_data_area_never_yields_out_of_bounds_frames(daemon):
    """Fuzz: random bytes over unread frames (headers included).  Payload bytes themselves
    carry no checksum (spec/ring.md, "Validation": what is not promised), so what is
    asserted is that everything handed out is within the channel's limits and in order, and
    that nothing but RingCorrupted escapes."""
    rng = random.Random(8)
    corrupted = 0
    for trial in range(40):
        name = f"fuzz.{trial}"
        ch, sub = _filled(daemon, name, n=25)
        v = ch._view
        tail = v.q[ring.W_TAIL]
        for _ in range(rng.randint(1, 4)):
            at = rng.randrange(0, tail)
            n = rng.randint(1, 64)
            v.mv[_frame_at(ch, at):_frame_at(ch, at) + n] = rng.randbytes(n)[:CAP - (at % CAP)]
        prev = -1
        try:
            while True:
                msg = sub.receive_nowait() if trial % 2 else None
                if trial % 2 == 0:
                    try:
                        data = sub.receive_bytes(timeout=0)
                    except shimmy.ReceiveTimeout:
                        break
                    seq, length = sub.last_seq, len(data)
                elif msg is None:
                    break
                else:
                    seq, length = msg.seq, len(msg)
                assert length <= ch.max_message and seq > prev and sub.lost <= ring.MAX_SEQ_GAP
                prev = seq
        except RingCorrupted as exc:
            assert f"channel '{name}' is corrupted" in str(exc)
            corrupted += 1
        ch.close()
        get_client(daemon.socket).request("delete", name=name)
    assert corrupted >= 10   # the garbage was noticed, not silently handed out


def test_garbage_slot_high_publisher_raises_then_daemon_restores_it(daemon):
    """Finding 6: a garbage slot_high made the publisher raise IndexError."""
    ch = shimmy.Channel("victim", daemon=daemon.socket, capacity=CAP)
    sub = ch.subscribe()
    ch._view.u32[ring.I_SLOT_HIGH] = 0xFFFF_FFFF
    with pytest.raises(RingCorrupted, match="slot_high 4294967295 exceeds max_subscribers"):
        for seq in range(200):          # past the first lap: the publisher scans the slots
            ch.publish(payloads.make(seq, 100))
            sub.receive(timeout=1)
    # slot_high is the daemon's word: listing restores it from the daemon's books.
    get_client(daemon.socket).request("list")
    assert ch._view.u32[ring.I_SLOT_HIGH] == 1
    seq = ch.publish(b"after repair")
    while (msg := sub.receive(timeout=1)).seq != seq:
        pass
    assert bytes(msg) == b"after repair"
    ch.close()


def test_subscriber_position_past_the_tail_is_reported_by_the_publisher(daemon):
    ch = shimmy.Channel("victim", daemon=daemon.socket, capacity=CAP)
    sub = ch.subscribe()
    ch._view.q[ch._view.slot_word(sub.slot)] = 2**50
    with pytest.raises(RingCorrupted, match="subscriber slot 0 position 1125899906842624 is past"):
        for seq in range(200):
            ch.publish(payloads.make(seq, 100))
    ch.close()


def test_one_broken_ring_never_breaks_ls_or_stat_and_rm_retires_it(daemon):
    broken, _ = _filled(daemon, "broken")
    healthy, healthy_sub = _filled(daemon, "healthy")
    broken._view.q[ring.W_HEAD] = broken._view.q[ring.W_TAIL] + 16   # head past the tail
    client = get_client(daemon.socket)
    entries = {c["name"]: c for c in client.request("list")["channels"]}
    assert "channel 'broken' is corrupted" in entries["broken"]["broken"]
    assert entries["healthy"]["broken"] is None and entries["healthy"]["published"] == 10
    assert {c["name"] for c in client.request("stat")["channels"]} == {"broken", "healthy"}
    cli = [sys.executable, "-m", "shimmy.cli"]
    ls = subprocess.run([*cli, "ls", "--daemon", daemon.socket], capture_output=True, text=True,
                        timeout=60)
    assert ls.returncode == 0 and "healthy" in ls.stdout and "Traceback" not in ls.stderr
    assert "BROKEN" in ls.stdout and "broken: " in ls.stdout, ls.stdout
    # A new subscriber of the broken channel gets a clear error; others are unaffected.
    with pytest.raises(RingCorrupted, match="channel 'broken' is corrupted"):
        broken.subscribe()
    assert healthy_sub.receive(timeout=1).seq == 0
    shm = "/dev/shm/" + entries["broken"]["shm"].lstrip("/")
    assert os.path.exists(shm)
    rm = subprocess.run([*cli, "rm", "--daemon", daemon.socket, "broken"], capture_output=True,
                        text=True, timeout=60)
    assert rm.returncode == 0, rm.stderr
    assert not os.path.exists(shm)
    assert [c["name"] for c in client.request("list")["channels"]] == ["healthy"]
    broken.close()
    healthy.close()


def test_stream_garbage_tail_raises_ring_corrupted(daemon):
    from shimmy import stream_ring
    w = shimmy.Stream("pipe", daemon=daemon.socket, capacity=CAP).writer()
    r = shimmy.Stream("pipe", daemon=daemon.socket).reader()
    w.write(b"x" * 100)
    assert r.read(100, timeout=1) == b"x" * 100
    w._view.q[stream_ring.OFF_TAIL // 8] = 100 + CAP * 8
    with pytest.raises(RingCorrupted, match=r"stream 'pipe' is corrupted: head 100 and tail"):
        r.read(100, timeout=1)
    w.close()
    r.close()


def _in_private_shm(code: str, fill: bool) -> subprocess.CompletedProcess:
    """Run ``code`` in a private mount namespace whose /dev/shm is a 4 KiB tmpfs (full when
    ``fill``): a real ENOSPC, not a simulated one."""
    script = ("mount -t tmpfs -o size=4k tmpfs /dev/shm && "
              + ("dd if=/dev/zero of=/dev/shm/fill bs=4k count=1 2>/dev/null && " if fill else "")
              + f'exec "{sys.executable}" -c "$0"')
    return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script,
                           code], capture_output=True, text=True, timeout=60)


needs_unshare = pytest.mark.skipif(
    os.geteuid() != 0 or subprocess.run(["unshare", "--mount", "true"],
                                        capture_output=True).returncode != 0,
    reason="needs root and unshare(1) for a private /dev/shm")


@needs_unshare
def test_import_works_on_a_full_dev_shm_and_the_fence_fails_clearly():
    """Finding 7: a full /dev/shm broke `import shimmy` (a semaphore was made at import)."""
    code = ("import shimmy, shimmy.ring, shimmy.sdk.channel, shimmy.sdk.stream\n"
            "print('imported')\n"
            "try:\n"
            "    shimmy.ring.fence()\n"
            "except shimmy.LimitExceeded as exc:\n"
            "    print('LimitExceeded:', exc)\n")
    proc = _in_private_shm(code, fill=True)
    assert proc.returncode == 0, proc.stderr
    assert "imported" in proc.stdout
    assert "LimitExceeded: cannot create the process's fence semaphore" in proc.stdout
    assert "No space left on device" in proc.stdout and "Traceback" not in proc.stderr


@needs_unshare
def test_fence_semaphore_is_created_on_first_use_and_not_left_behind():
    code = ("import os, shimmy.ring\n"
            "print(sorted(os.listdir('/dev/shm')))\n"
            "shimmy.ring.fence(); shimmy.ring.fence()\n"
            "print(sorted(os.listdir('/dev/shm')))\n")
    proc = _in_private_shm(code, fill=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["[]", "[]"]
