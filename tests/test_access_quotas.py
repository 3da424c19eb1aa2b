"""Per-tenant quotas (docs/security.md) on a real daemon: each refusal names the setting."""

from __future__ import annotations

import pytest

import shimmy
from shimmy.sdk.client import get_client


def _daemon(daemon_factory, tmp_path, text):
    cfg = tmp_path / "quota.toml"
    cfg.write_text(text)
    return daemon_factory("--config", str(cfg))


def test_channel_subscriber_and_byte_quotas(daemon_factory, tmp_path):
    d = _daemon(daemon_factory, tmp_path, "quota_channels = 2\nquota_subscribers = 2\n"
                                          "quota_shm_bytes = 400000\n")
    a = shimmy.Channel("q/a", daemon=d.socket, capacity=65536)
    b = shimmy.Channel("q/b", daemon=d.socket, capacity=65536)
    with pytest.raises(shimmy.LimitExceeded, match=r"uid:0 holds 2 channels.*quota_channels=2"):
        shimmy.Channel("q/c", daemon=d.socket, capacity=65536)
    a.subscribe(), b.subscribe()
    with pytest.raises(shimmy.LimitExceeded, match="quota_subscribers=2"):
        a.subscribe()
    b.close()
    get_client(d.socket).request("delete", name="q/b")   # gives its channel quota back
    with pytest.raises(shimmy.LimitExceeded, match="quota_shm_bytes=400000 bytes"):
        shimmy.Channel("q/big", daemon=d.socket, capacity=1 << 20)
    a.close()
