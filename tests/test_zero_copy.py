"""Zero-copy writes (loan) and reads (Message.data views)."""

from __future__ import annotations

import numpy as np
import pytest

import shimmy


def test_aborted_loan_publishes_nothing(daemon):
    with shimmy.Channel("loan/abort", daemon=daemon.socket) as ch:
        sub = ch.subscribe()
        with pytest.raises(KeyError):
            with ch.loan(8) as buf:
                buf[:] = b"discard!"
                raise KeyError("abort")
        assert sub.receive_nowait() is None
        with ch.loan(4) as buf:
            buf[:] = b"kept"
        msg = sub.receive(timeout=1)
        assert bytes(msg) == b"kept"
        assert msg.seq == 0, "the aborted loan used no sequence number"


def test_loan_view_is_released_after_the_block(daemon):
    with shimmy.Channel("loan/release", daemon=daemon.socket) as ch:
        with ch.loan(3) as buf:
            buf[:] = b"abc"
        with pytest.raises(ValueError):
            buf[0] = 1  # released memoryview


def test_loan_wrapping_the_ring_many_times(daemon):
    with shimmy.Channel("loan/wrap", daemon=daemon.socket, capacity=4096) as ch:
        sub = ch.subscribe()
        for i in range(500):
            n = (i * 37) % 1000
            with ch.loan(n) as buf:
                buf[:] = bytes([i % 251]) * n
            msg = sub.receive(timeout=1)
            assert bytes(msg) == bytes([i % 251]) * n and msg.seq == i


def test_held_view_keeps_its_bytes_in_reliable_mode(daemon):
    with shimmy.Channel("hold/reliable", daemon=daemon.socket, capacity=4096) as ch:
        sub = ch.subscribe()
        ch.publish(b"A" * 1000)
        msg = sub.receive(timeout=1)
        view = msg.data
        # The publisher cannot reuse the held frame: it fills the rest and then times out.
        with pytest.raises(shimmy.BackpressureTimeout):
            for _ in range(100):
                ch.publish(b"B" * 1000, timeout=0.2)
        assert bytes(view) == b"A" * 1000 and msg.valid()
        assert view.readonly


def test_overwritten_view_is_detected_in_lossy_mode(daemon):
    with shimmy.Channel("hold/lossy", daemon=daemon.socket, mode="lossy", capacity=4096) as ch:
        sub = ch.subscribe()
        ch.publish(b"A" * 1000)
        msg = sub.receive(timeout=1)
        assert msg.valid()
        for _ in range(20):
            ch.publish(b"B" * 1000)  # laps the ring: the held frame is gone
        assert not msg.valid()
        with pytest.raises(shimmy.MessageOverwritten, match="overwritten"):
            bytes(msg)
        nxt = sub.receive(timeout=1)
        assert nxt.lost > 0 and bytes(nxt) == b"B" * 1000


def test_numpy_frombuffer_reads_the_ring_without_copying(daemon):
    with shimmy.Channel("numpy", daemon=daemon.socket) as ch:
        sub = ch.subscribe()
        arr = np.arange(1000, dtype=np.float64)
        with ch.loan(arr.nbytes) as buf:
            np.frombuffer(buf, dtype=np.float64)[:] = arr   # written in place, no bytes object
        msg = sub.receive(timeout=1)
        view = np.frombuffer(msg.data, dtype=np.float64)
        assert np.array_equal(view, arr)
        assert not view.flags.writeable and not view.flags.owndata
        assert view.ctypes.data % 8 == 0, "frames are 16-byte aligned"


def test_release_lets_the_publisher_reuse_the_frame(daemon):
    with shimmy.Channel("release", daemon=daemon.socket, capacity=4096) as ch:
        sub = ch.subscribe()
        for i in range(100):
            ch.publish(b"x" * 1000, timeout=1)
            msg = sub.receive(timeout=1)
            msg.release()
            assert msg.seq == i


def test_publish_accepts_any_contiguous_buffer(daemon):
    with shimmy.Channel("buffers", daemon=daemon.socket) as ch:
        sub = ch.subscribe()
        arr = np.arange(100, dtype=np.float64)         # len() is 100, its bytes are 800
        for data in (arr, bytearray(b"ba"), memoryview(b"mv"), b""):
            ch.publish(data)
            assert sub.receive_bytes(timeout=1) == bytes(memoryview(data))
        with pytest.raises(ValueError, match="contiguous"):
            ch.publish(arr[::2])
        ch.publish(b"still fine")
        assert sub.receive_bytes(timeout=1) == b"still fine"
