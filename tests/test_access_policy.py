"""daemon/access.py decisions, from a Caller to allow/refuse (pure; the real-uid proofs are in
tests/test_access_uids.py)."""

from __future__ import annotations

import os

import pytest

from shimmy.daemon.access import AccessControl
from shimmy.daemon.identity import Caller
from shimmy.daemon.rules import parse_rule
from shimmy.daemon.config import SettingError, Settings
from shimmy.errors import PermissionDenied

OWNER = Caller(uid=1001, gid=1001, pid=10)
OTHER = Caller(uid=1002, gid=1002, groups=frozenset({3000}), pid=11)
K8S = Caller(uid=5, gid=5, pid=12, container="c" * 64,
             labels=(("io.kubernetes.pod.namespace", "monitoring"), ("team", "sre")))


def control(**kw) -> AccessControl:
    return AccessControl(Settings(**kw))


def test_owner_only_by_default_and_the_message_names_uid_channel_and_rule():
    ac = control()
    own = ac.ownership_for(OWNER, "a/x", "uid:1001")
    assert (own.uid, own.mode) == (1001, 0o600)
    for op in ("open", "publish", "subscribe", "delete", "stat"):
        ac.check(OWNER, op, "a/x", own)
        with pytest.raises(PermissionDenied, match=r"uid 1002 .* may not %s channel 'a/x': it "
                                                   r"belongs to uid 1001 \(access=owner" % op):
            ac.check(OTHER, op, "a/x", own)


def test_root_administers_but_gets_no_roles():
    ac = control()
    own = ac.ownership_for(OWNER, "a/x", "uid:1001")
    root = Caller(uid=0, gid=0)
    ac.check(root, "delete", "a/x", own)
    ac.check(root, "stat", "a/x", own)
    for op in ("open", "publish", "subscribe"):
        assert not ac.allows(root, op, "a/x", own)


def test_channel_group_shares_everything_with_members():
    ac = control(channel_group="3000")
    own = ac.ownership_for(OWNER, "a/x", "uid:1001")
    assert (own.file_gid, own.mode) == (3000, 0o660)
    ac.check(OTHER, "publish", "a/x", own)       # OTHER has 3000 as a supplementary group
    assert not ac.allows(Caller(uid=7, gid=7), "open", "a/x", own)


def test_rules_grant_listed_ops_by_label_and_namespace():
    ac = control(channel_rules=["metrics/** namespace=monitoring ops=subscribe",
                                "debug/* label=team=sre"])
    own = ac.ownership_for(OWNER, "metrics/cpu", "uid:1001")
    ac.check(K8S, "subscribe", "metrics/cpu", own)
    ac.check(K8S, "open", "metrics/cpu", own)
    assert not ac.allows(K8S, "publish", "metrics/cpu", own)
    dbg = ac.ownership_for(OWNER, "debug/x", "uid:1001")
    ac.check(K8S, "publish", "debug/x", dbg)
    assert not ac.allows(K8S, "delete", "debug/x", dbg)     # not in the default ops
    assert not ac.allows(OTHER, "open", "debug/x", dbg)     # no such label


def test_owner_rules_reserve_names():
    ac = control(channel_rules=["feeds/** owner=1001"])
    ac.ownership_for(OWNER, "feeds/a", "uid:1001")
    with pytest.raises(PermissionDenied, match="reserves it for uid 1001"):
        ac.ownership_for(OTHER, "feeds/a", "uid:1002")


def test_open_access_is_everything_and_world_writable_objects():
    ac = control(access="open")
    own = ac.ownership_for(OWNER, "a/x", "uid:1001")
    assert own.mode == 0o666
    ac.check(OTHER, "delete", "a/x", own)


@pytest.mark.skipif(os.geteuid() == 0, reason="only a non-root daemon lacks chown")
def test_a_non_root_daemon_refuses_to_create_for_another_uid_without_a_group():
    with pytest.raises(PermissionDenied, match="set channel_group"):
        control().ownership_for(Caller(uid=os.geteuid() + 1, gid=1), "a/x", "uid:x")


@pytest.mark.parametrize("text, match", [
    ("", "empty rule"),
    ("a/** uid", "is not key=value"),
    ("a/** color=red", "unknown key 'color'"),
    ("a/** ops=publish,explode", "unknown ops"),
    ("a/** label=team", "label= needs KEY=VALUE"),
    ("a/** uid=no-such-user-xyz", "no user named"),
    ("a/** serviceaccount=default", "service accounts are not visible"),
])
def test_bad_rules_name_the_rule(text, match):
    with pytest.raises(SettingError, match=match):
        parse_rule(text)
