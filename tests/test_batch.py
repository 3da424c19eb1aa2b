"""Batches (``Channel.publish_many`` / ``Subscription.receive_many``) across real processes:
order and checksums, reliable back-pressure in the middle of a batch, exact loss accounting in
lossy mode, and errors inside a batch that name the message and lose nothing before it."""

from __future__ import annotations

import pytest
from test_pubsub import result, spawn, start_subscribers
from workers import payload

import shimmy
from shimmy.sdk.client import get_client
from shimmy import ring


@pytest.mark.parametrize("sub_api", ["batch", "single"])
def test_reliable_batches_arrive_in_order_intact_through_backpressure(daemon, tmp_path, sub_api):
    # A small ring, large messages and a slow subscriber: batches (up to 64 messages) cross the
    # wrap point and wait for room in their middle, many times over.
    capacity = 1 << 14
    max_size = ring.max_message_size(capacity) // 4
    common = ["--mode", "reliable", "--capacity", str(capacity), "--max-size", str(max_size)]
    count = 20_000
    sub_args = ["--batch", "50"] if sub_api == "batch" else ["--copy-path"]
    (slow,) = start_subscribers(daemon, tmp_path, "batch/rel", 1, *common, "--count", str(count),
                                *sub_args, "--slow", "0.002")
    (fast,) = start_subscribers(daemon, tmp_path, "batch/rel", 1, *common, "--count", str(count),
                                "--batch", "7")
    pub = spawn(daemon, "publish", "batch/rel", *common, "--count", str(count), "--batch", "64")
    assert result(pub)["published"] == count
    crcs = set()
    for proc in (slow, fast):
        r = result(proc)
        assert (r["received"], r["lost"], r["bad"], r["last_seq"]) == (count, 0, 0, count - 1), r
        crcs.add(r["crc"])
    assert len(crcs) == 1
    stats = shimmy.Channel("batch/rel", daemon=daemon.socket)
    try:
        assert stats._view.q[ring.OFF_WAITS // 8] > 0, "the publisher never waited for room"
    finally:
        stats.close()


def test_lossy_batches_count_exactly_what_was_lost(daemon, tmp_path):
    capacity = 1 << 14
    common = ["--mode", "lossy", "--capacity", str(capacity), "--max-size", "300"]
    count = 50_000
    subs = start_subscribers(daemon, tmp_path, "batch/lossy", 1, *common, "--count", str(count),
                             "--batch", "16", "--slow", "0.001", "--idle", "2")
    subs += start_subscribers(daemon, tmp_path, "batch/lossy", 1, *common, "--count", str(count),
                              "--copy-path", "--idle", "2")
    pub = spawn(daemon, "publish", "batch/lossy", *common, "--count", str(count), "--batch", "100")
    assert result(pub)["published"] == count
    results = [result(proc) for proc in subs]
    for r in results:
        assert r["bad"] == 0, r
        assert r["received"] + r["lost"] == count and r["last_seq"] == count - 1, r
    assert results[0]["lost"] > 0, "the slow batch subscriber was never lapped"


def test_message_too_large_inside_a_batch_names_it_and_keeps_the_ones_before(daemon, tmp_path):
    capacity = 1 << 16
    big = ring.max_message_size(capacity) + 1
    with shimmy.Channel("batch/large", daemon=daemon.socket, mode="reliable",
                        capacity=capacity) as ch:
        (sub,) = start_subscribers(daemon, tmp_path, "batch/large", 1, "--max-size", "100",
                                   "--count", "5", "--batch", "10", "--idle", "5")
        good = [payload(i, 100) for i in range(3)]
        with pytest.raises(shimmy.MessageTooLarge, match="message 3 of the batch") as info:
            ch.publish_many([*good, b"x" * big, payload(3, 100)])
        assert info.value.published == 3
        assert str(big) in str(info.value)
        # The batch after the error goes on from the next sequence number.
        assert ch.publish_many([payload(3, 100), payload(4, 100)]) == 2
        r = result(sub)
        assert (r["received"], r["lost"], r["bad"], r["last_seq"]) == (5, 0, 0, 4), r


def test_backpressure_timeout_inside_a_batch_names_it_and_keeps_the_ones_before(daemon):
    with shimmy.Channel("batch/bp", daemon=daemon.socket, mode="reliable", capacity=4096) as ch:
        sub = ch.subscribe()
        msgs = [b"%04d" % i + b"x" * 96 for i in range(100)]   # 128-byte frames: 32 fit
        with pytest.raises(shimmy.BackpressureTimeout, match="of the batch") as info:
            ch.publish_many(msgs, timeout=0.2)
        n = info.value.published
        assert 0 < n < len(msgs) and f"message {n} of the batch" in str(info.value)
        got = []
        while True:
            try:
                got += sub.receive_many(1000, timeout=0.2)
            except shimmy.ReceiveTimeout:
                break
        assert got == msgs[:n], "exactly the messages before the one that timed out"
        assert sub.last_seq == n - 1 and sub.lost == 0


def test_batch_api_arguments_and_odd_buffers(daemon):
    import array
    with shimmy.Channel("batch/args", daemon=daemon.socket, mode="reliable") as ch:
        sub = ch.subscribe()
        assert ch.publish_many([]) == 0
        with pytest.raises(shimmy.ReceiveTimeout):
            sub.receive_many(10, timeout=0.05)
        with pytest.raises(shimmy.InvalidArgument, match="max_n"):
            sub.receive_many(0)
        items = [b"a", bytearray(b"bb"), memoryview(b"ccc"), array.array("i", [1, 2]), b""]
        assert ch.publish_many(iter(items)) == 5
        assert sub.receive_many(3) == [b"a", b"bb", b"ccc"]
        assert sub.receive_many(10) == [array.array("i", [1, 2]).tobytes(), b""]
        assert sub.last_seq == 4


@pytest.mark.parametrize("state", ["after-first-last", "after-tail", "committed"])
def test_batch_commit_states_keep_head_last_tail_and_exact_seq(daemon, state):
    """Every state a publisher killed inside a batch commit can leave (the three stores of
    RingWriter._commit_batch), made by rewinding the words of a real batch to that store (a
    fake crash: the stores are the only difference): ``list`` does not call the ring broken,
    stream_point is exact, a successor publisher numbers on from the right seq, and a reader
    from the oldest message sees 0, 1, 2, ... with no gap and no repeat."""
    ch = shimmy.Channel("batch/states", daemon=daemon.socket, mode="reliable")
    ch.publish(b"first")
    q = ch._view.q
    t0 = q[ring.W_TAIL]
    assert ch.publish_many([b"m%d" % k for k in range(5)]) == 5
    end, final = q[ring.W_TAIL], q[ring.W_LAST]
    assert t0 < final < end and q[ring.W_HEAD] <= final
    committed = {"after-first-last": (t0, t0), "after-tail": (t0, end), "committed": (final, end)}
    last, tail = committed[state]
    q[ring.W_LAST], q[ring.W_TAIL] = last, tail
    want_tail = (t0, 1) if state == "after-first-last" else (end, 6)
    assert ring.stream_point(ch._view) == want_tail
    (entry,) = [c for c in get_client(daemon.socket).request("list")["channels"]
                if c["name"] == "batch/states"]
    assert entry.get("broken") is None, entry
    ch.close()   # the publisher role is free: a successor resumes from the words as they are
    succ = shimmy.Channel("batch/states", daemon=daemon.socket)
    sub = succ.subscribe("oldest")
    succ.publish(b"next")
    seqs = []
    while True:
        msg = sub.receive(timeout=5)
        seqs.append(msg.seq)
        if bytes(msg.data) == b"next":
            break
    # after-first-last: the successor rolls the batch's first frame forward (seq 1); the four
    # frames after it were never committed and are overwritten.
    assert seqs == (list(range(3)) if state == "after-first-last" else list(range(7))), seqs
    assert sub.lost == 0
    succ.close()
