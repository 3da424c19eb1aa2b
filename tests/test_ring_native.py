"""The C module is refused at import where it disagrees with the Python ring (layout or names)."""

import pytest

from shimmy import ring, stream_ring


def test_a_layout_constant_that_differs_is_refused_naming_it_and_both_values():
    exported = dict(ring.core_layout()) or {"OFF_TAIL": ring.OFF_TAIL}
    exported["OFF_TAIL"] = ring.OFF_TAIL + 8
    with pytest.raises(ImportError, match=r"OFF_TAIL is 328, the Python layout's is 320"):
        ring.check_layout(exported, {"OFF_TAIL": ring.OFF_TAIL})


def test_a_constant_the_c_module_lacks_is_refused():
    with pytest.raises(ring.CoreMismatch, match=r"its WIDE_BIT is None"):
        ring.check_layout({}, {"WIDE_BIT": ring.WIDE_BIT})


def test_a_name_the_c_module_looks_up_that_python_lacks_is_refused():
    with pytest.raises(ImportError, match=r"'_take_py_renamed' on GroupReader"):
        ring.check_lookups({"ReaderCore": ("_take_py", "_take_py_renamed")},
                           {"ReaderCore": ring.GroupReader})


def test_instance_attributes_count_when_the_class_declares_them():
    ring.check_lookups({"WriterCore": ("_wakeups", "_mv"), "Wakeups": ("posted_w0", "wake")},
                       {"WriterCore": ring.RingWriter, "Wakeups": ring.Wakeups})


@pytest.mark.skipif(not ring.ACCELERATED, reason="the C extension is not loaded in this run")
def test_the_built_module_agrees_with_the_python_layout_and_names():
    layout = ring.core_layout()
    assert layout["OFF_TAIL"] == ring.OFF_TAIL and layout["S_OFF_HEAD"] == stream_ring.OFF_HEAD
    assert len(layout) >= 20   # every #define of _ringcore.c's ring and stream offsets
    ring.check_layout(layout, {n: getattr(ring, n) for n in layout if not n.startswith("S_")})
    ring.check_layout(layout, {n: getattr(stream_ring, n[2:]) for n in layout
                               if n.startswith("S_")})
    ring.check_lookups(ring._core.LOOKUPS, {"WriterCore": ring.RingWriter,
                                            "ReaderCore": ring.GroupReader,
                                            "StreamWriterCore": stream_ring.WriterCursor,
                                            "StreamReaderCore": stream_ring.ReaderCursor})
