"""Access policy: who may do what with a channel, and who owns its shared-memory objects.

Identity (who the client is: uid, groups, container) comes from :mod:`.identity`, what its
container labels allow from :mod:`.label_policy`; this module decides the rest.  The rules
(``docs/security.md`` has the recipes and the threat model):

* **A channel belongs to the uid that created it** (``access = "owner"``, the default).  Only that
  uid may open, publish, subscribe, delete or see the details of it, unless
* ``channel_group`` is set: every channel's objects belong to that group and every member of it
  (primary or supplementary group of the client process) may use every channel; or
* a ``channel_rules`` entry opens matching channels to other clients::

      PATTERN [owner=UID] [uid=UID] [gid=GID] [label=KEY=VALUE] [namespace=NS] [ops=OP,...]

  ``owner=`` reserves the matching names for one uid (nobody else may create them: no squatting
  a name before its owner starts); ``uid``/``gid``/``label``/``namespace`` (all given must hold)
  say who else is let in, ``ops`` (default ``open,publish,subscribe``; also ``delete``) what they
  may do.  A rule with ``gid=`` also gives the matching channels' objects to that group, so its
  members can map them.
* root (uid 0) may delete any channel and see every channel's details (administration); it has
  no other rights over another uid's channels.
* ``access = "open"`` turns all of this off: every local uid may do everything and the objects
  are mode 0666 (single-tenant hosts only).  ``access = "closed"`` is ``owner`` plus: a container
  without access labels gets nothing (see :mod:`.label_policy`).

Every refusal is :class:`~shimmy.errors.PermissionDenied` naming the uid, the channel and the rule.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from shimmy.errors import PermissionDenied

from .config import Settings
from .identity import Caller
from .rules import Rule, parse_rule
from .setting_values import parse_mode, resolve_group

OPS = ("open", "publish", "subscribe", "delete", "stat")


@dataclass(frozen=True)
class Ownership:
    """Whose a channel is, and what its shared-memory objects get (``fchown``/``fchmod``)."""

    uid: int                    # the owning uid (the creator)
    file_uid: int               # uid given to the objects (-1: leave the daemon's)
    file_gid: int               # gid given to the objects (-1: leave the daemon's)
    mode: int
    group: int | None = None    # the group that shares the channel, if any
    principal: str = ""         # quota account of the creator
    size: int = 0               # bytes of shared memory, for quotas
    member: bool = False        # a publisher's member ring (its bytes count, not as a channel)


@dataclass
class AccessControl:
    settings: Settings
    rules: list[Rule] = field(default_factory=list)

    def __post_init__(self) -> None:
        s = self.settings
        self.rules = [parse_rule(r) for r in s.channel_rules]
        self.open = s.access == "open"
        self.group = resolve_group("channel_group", s.channel_group) if s.channel_group else None
        self.private_mode = parse_mode("object_mode", s.object_mode)
        self.shared_mode = parse_mode("shared_object_mode", s.shared_object_mode)
        self.daemon_uid = os.geteuid()

    # -- ownership of new channels ------------------------------------------------------------
    def ownership_for(self, caller: Caller, channel: str, principal: str,
                      kind: str = "channel") -> Ownership:
        """The ownership a channel (or stream: ``kind``) ``caller`` creates gets, or
        PermissionDenied if it may not create it (the name is reserved for another uid, or its
        objects could not be made usable by the caller)."""
        if self.open:
            return Ownership(caller.uid, -1, -1, 0o666, None, principal)
        for rule in self.rules:
            if rule.owner is not None and rule.matches(channel) and rule.owner != caller.uid:
                raise PermissionDenied(
                    f"{caller.describe()} may not create {kind} {channel!r}: rule "
                    f"{rule.text!r} reserves it for uid {rule.owner}")
        group = self.group
        if group is None:
            group = next((r.gid for r in self.rules if r.gid is not None and r.matches(channel)),
                         None)
        root = self.daemon_uid == 0
        file_uid = caller.uid if root else -1
        if group is not None:
            return Ownership(caller.uid, file_uid, group, self.shared_mode, group, principal)
        if not root and caller.uid != self.daemon_uid:
            raise PermissionDenied(
                f"{caller.describe()} may not create {kind} {channel!r}: the daemon runs as uid "
                f"{self.daemon_uid} without the privilege to give the {kind}'s memory to uid "
                f"{caller.uid}; set channel_group to a group both are members of "
                f"(docs/security.md)")
        return Ownership(caller.uid, file_uid, -1, self.private_mode, None, principal)

    def default_ownership(self) -> Ownership:
        """Objects made for no client (replicas of remote channels): the daemon's uid, shared
        with channel_group when set."""
        if self.open:
            return Ownership(self.daemon_uid, -1, -1, 0o666)
        if self.group is not None:
            return Ownership(self.daemon_uid, -1, self.group, self.shared_mode, self.group)
        return Ownership(self.daemon_uid, -1, -1, self.private_mode)

    # -- checks -------------------------------------------------------------------------------
    def allows(self, caller: Caller, op: str, channel: str, owner: Ownership | None) -> bool:
        try:
            self.check(caller, op, channel, owner)
        except PermissionDenied:
            return False
        return True

    def check(self, caller: Caller, op: str, channel: str, owner: Ownership | None,
              kind: str = "channel") -> None:
        """Return if ``caller`` may ``op`` the existing channel (or stream: ``kind``) owned as
        ``owner`` (``None``: made for no client, owned by the daemon), else raise
        PermissionDenied naming the rule."""
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}")
        if self.open:
            return
        owner_uid = owner.uid if owner is not None else self.daemon_uid
        group = self.group   # channel_group shares everything; a rule's gid only its ops
        if caller.uid == owner_uid:
            return
        if op in ("delete", "stat") and caller.uid == 0:
            return  # administration by root
        if group is not None and caller.in_group(group):
            return
        for rule in self.rules:
            if rule.matches(channel) and rule.grants(caller) and (
                    op in rule.ops or op == "stat" or (op == "open" and len(rule.ops) > 0)):
                return
        shared = f" or members of group {group}" if group is not None else ""
        raise PermissionDenied(
            f"{caller.describe()} may not {op} {kind} {channel!r}: it belongs to uid "
            f"{owner_uid}{shared} (access={self.settings.access}: only the owner may use a "
            f"{kind} unless channel_group or a channel_rules entry opens it; docs/security.md)")
