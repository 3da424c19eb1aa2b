"""Cross-language traffic: the C client (shimmy-c, built from libshimmy) and the Python SDK on the
same channels and streams of a real daemon.  100,000 numbered, checksummed messages of mixed
sizes (8..3000 bytes, through a 256 KiB ring: hundreds of wraps) each way, reliable and lossy
(lossy: received + lost = published, exactly), a publisher group with C and Python publishers
read by a C and a Python subscriber, the exclusive publisher role handed between the languages,
and a stream each way."""

from __future__ import annotations

import threading

import pytest

import shimmy
from tests.c_client import (check, needs_c, needs_v2, payload, run, size_of, start,
                            stream_bytes, wait_file)

pytestmark = [needs_c, needs_v2]

N = 100_000
SIZE = 3000
CAP = 1 << 18


def _drain(sub, count: int, lossy: bool, per_publisher: bool = False) -> tuple[int, int]:
    """Receive (Python) until ``count`` messages are accounted for; check every byte and that
    indexes go up by one per publisher, or by exactly the loss the subscription counted."""
    received = first = 0
    expect: dict[int, int] = {}
    while received + (sub.lost if lossy else 0) < count:
        before = sub.lost
        data = sub.receive_bytes(timeout=30)
        index = check(data)
        assert len(data) == size_of(index, SIZE), (index, len(data))
        who = sub.last_publisher if per_publisher else 0
        gap = sub.lost - before
        if who in expect:
            assert index == expect[who] + gap, (who, index, expect[who], gap)
        elif received == 0:
            first = index
        expect[who] = index + 1
        received += 1
    if not lossy:
        assert sub.lost == 0
    return received, first


@pytest.mark.parametrize("mode", ["reliable", "lossy"])
@pytest.mark.parametrize("how", [[], ["--batch", "64"], ["--loan"]],
                         ids=["publish", "batch", "loan"])
def test_c_publisher_python_subscriber(daemon, mode, how):
    name = f"c2py/{mode}/{len(how)}"
    ch = shimmy.Channel(name, daemon=daemon.socket, mode=mode, capacity=CAP)
    sub = ch.subscribe()
    pub = start("pub", "--daemon", daemon.socket, "--count", str(N), "--size", str(SIZE),
                "--mixed", "--mode", mode, "--capacity", str(CAP), *how, name)
    try:
        received, first = _drain(sub, N, mode == "lossy")
    finally:
        out, err = pub.communicate(timeout=120)
    assert pub.returncode == 0, out + err
    if mode == "reliable":
        assert (received, first) == (N, 0)
    else:
        assert received > 0 and received + sub.lost == N
    ch.close()


@pytest.mark.parametrize("mode", ["reliable", "lossy"])
@pytest.mark.parametrize("receive", ["view", "copy", "many"])
def test_python_publisher_c_subscriber(daemon, tmp_path, mode, receive):
    name = f"py2c/{mode}/{receive}"
    ready = tmp_path / "ready"
    sub = start("sub", "--daemon", daemon.socket, "--count", str(N), "--size", str(SIZE),
                "--mixed", "--mode", mode, "--capacity", str(CAP), "--receive", receive,
                "--ready", str(ready), name)
    wait_file(ready, sub)
    ch = shimmy.Channel(name, daemon=daemon.socket, mode=mode, capacity=CAP)
    i = 0
    while i < N:   # single publishes and batches in turn
        if (i // 1000) % 2:
            k = min(100, N - i)
            ch.publish_many([payload(j, size_of(j, SIZE)) for j in range(i, i + k)])
            i += k
        else:
            ch.publish(payload(i, size_of(i, SIZE)))
            i += 1
    out, err = sub.communicate(timeout=120)
    ch.close()
    assert sub.returncode == 0, out + err
    lines = out.splitlines()
    if mode == "reliable":
        assert lines == [f"received {N} in order from #0"], out
    else:
        got = int(lines[0].split()[1])
        lost = int(lines[1].split()[1]) if len(lines) > 1 else 0
        assert lines[0].startswith(f"received {got} in order from #") and got + lost == N, out


def test_group_with_c_and_python_publishers(daemon, tmp_path):
    """max_publishers 4: two C and two Python publishers, 25,000 messages each; a C and a
    Python subscriber each get all 100,000, every publisher's in its order."""
    name = "mixed/group"
    ready = tmp_path / "ready"
    csub = start("sub", "--daemon", daemon.socket, "--count", str(N), "--size", str(SIZE),
                 "--mixed", "--max-publishers", "4", "--capacity", str(CAP), "--ready",
                 str(ready), name)
    wait_file(ready, csub)
    ch = shimmy.Channel(name, daemon=daemon.socket, max_publishers=4, capacity=CAP)
    pysub = ch.subscribe()
    each = N // 4
    cpubs = [start("pub", "--daemon", daemon.socket, "--count", str(each), "--size", str(SIZE),
                   "--mixed", "--max-publishers", "4", name) for _ in range(2)]

    def python_publisher() -> None:
        with shimmy.Channel(name, daemon=daemon.socket, max_publishers=4) as mine:
            for i in range(each):
                mine.publish(payload(i, size_of(i, SIZE)))

    threads = [threading.Thread(target=python_publisher) for _ in range(2)]
    for t in threads:
        t.start()
    publishers: dict[int, int] = {}
    for _ in range(N):
        data = pysub.receive_bytes(timeout=30)
        index = check(data)
        who = pysub.last_publisher
        assert index == publishers.get(who, 0), (who, index)
        publishers[who] = index + 1
    assert sorted(publishers.values()) == [each] * 4 and pysub.lost == 0
    for t in threads:
        t.join()
    for p in cpubs:
        out, err = p.communicate(timeout=60)
        assert p.returncode == 0, out + err
    out, err = csub.communicate(timeout=60)
    assert csub.returncode == 0 and out.splitlines() == [f"received {N} in order from #0"], \
        out + err
    ch.close()


def test_exclusive_role_between_languages(daemon):
    """One publisher at a time: C is refused while Python holds the role (PublisherBusy, the
    daemon's text), then takes it over and continues the channel's numbering; Python after it."""
    name = "handover"
    watcher = shimmy.Channel(name, daemon=daemon.socket, capacity=1 << 20)   # holds all 3000
    sub = watcher.subscribe()
    py = shimmy.Channel(name, daemon=daemon.socket)
    for i in range(1000):
        py.publish(payload(i, 100))
    busy = run("pub", "--daemon", daemon.socket, "--count", "1", "--size", "100", name)
    assert busy.returncode == 1 and "(publisher_busy)" in busy.stderr, busy.stderr
    assert "Traceback" not in busy.stderr
    py.close()
    took = run("pub", "--daemon", daemon.socket, "--count", "1000", "--first", "1000", "--size",
               "100", name)
    assert took.returncode == 0, took.stderr
    with shimmy.Channel(name, daemon=daemon.socket) as again:
        for i in range(2000, 3000):
            assert again.publish(payload(i, 100)) == i
    for i in range(3000):
        data = sub.receive_bytes(timeout=10)
        assert check(data) == i and sub.last_seq == i
    watcher.close()


def test_stream_c_writer_python_reader(daemon):
    total = 20_000_000
    writer = start("stream-write", "--daemon", daemon.socket, "--size", str(total), "--chunk",
                   "70000", "s/c2py")
    got = 0
    with shimmy.Stream("s/c2py", daemon=daemon.socket).reader(timeout=30) as r:
        while True:
            chunk = r.read(1 << 16)
            if not chunk:
                break
            assert chunk == stream_bytes(got, len(chunk)), f"stream torn near byte {got}"
            got += len(chunk)
    out, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, out + err
    assert got == total


def test_stream_python_writer_c_reader(daemon, tmp_path):
    total = 20_000_000
    ready = tmp_path / "ready"
    reader = start("stream-read", "--daemon", daemon.socket, "--size", str(total), "--ready",
                   str(ready), "s/py2c")
    wait_file(ready, reader)
    with shimmy.Stream("s/py2c", daemon=daemon.socket).writer(timeout=30) as w:
        at = 0
        while at < total:
            n = min(99_999, total - at)
            w.write(stream_bytes(at, n))
            at += n
    out, err = reader.communicate(timeout=60)
    assert reader.returncode == 0 and out.strip() == f"read {total} bytes in order", out + err


def test_c_subscriber_starts_oldest_or_next(daemon):
    """start=oldest reads what the ring still holds from before the subscription; next does not
    (spec/ring.md, "Start points")."""
    ch = shimmy.Channel("start/points", daemon=daemon.socket, capacity=CAP)
    for i in range(100):
        ch.publish(payload(i, size_of(i, 500)))
    oldest = run("sub", "--daemon", daemon.socket, "--count", "100", "--start", "oldest",
                 "--size", "500", "--mixed", "start/points")
    assert oldest.returncode == 0 and oldest.stdout == "received 100 in order from #0\n", \
        oldest.stdout + oldest.stderr
    nothing = run("sub", "--daemon", daemon.socket, "--count", "1", "--start", "next",
                  "--timeout", "0.2", "start/points")
    assert nothing.returncode == 1 and "(timeout)" in nothing.stderr, nothing.stderr
    assert "no message on 'start/points' within 0.2 s" in nothing.stderr
    ch.close()
