"""The public API is what shimmy/__init__.py exports: its names, and the error types as
shimmy/errors.py and spec/control.md define them."""

from __future__ import annotations

import pytest

import shimmy


def test_exports_exist_and_are_public():
    for name in shimmy.__all__:
        assert hasattr(shimmy, name), name
    assert {"Channel", "Subscription", "Message", "Stream"} <= set(shimmy.__all__)


@pytest.mark.parametrize("error, builtin", [
    (shimmy.DaemonUnavailable, ConnectionError),
    (shimmy.ReceiveTimeout, TimeoutError),
    (shimmy.BackpressureTimeout, TimeoutError),
    (shimmy.InvalidName, ValueError),
    (shimmy.MessageTooLarge, ValueError),
    (shimmy.PermissionDenied, PermissionError),
    (shimmy.StreamBroken, BrokenPipeError),
])
def test_errors_mix_in_the_matching_builtin(error, builtin):
    assert issubclass(error, shimmy.ShimmyError) and issubclass(error, builtin)


def test_every_exported_error_derives_from_shimmy_error():
    for name in shimmy.__all__:
        obj = getattr(shimmy, name)
        if isinstance(obj, type) and issubclass(obj, BaseException):
            assert issubclass(obj, shimmy.ShimmyError), name
