"""The ``channel_rules`` grammar: one rule opens matching channels to other clients.

``PATTERN [owner=UID] [uid=UID] [gid=GID] [label=KEY=VALUE] [namespace=NS] [ops=OP,...]``
(``docs/security.md``).  :func:`parse_rule` reads one entry when the settings are validated;
:class:`Rule` says whom it grants and which names it covers.  What a grant means for a request is
decided in :mod:`.access`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .identity import Caller
from .label_policy import channel_matches
from .setting_values import SettingError, resolve_group, resolve_user

RULE_OPS = ("open", "publish", "subscribe", "delete")
DEFAULT_RULE_OPS = ("open", "publish", "subscribe")
NAMESPACE_LABEL = "io.kubernetes.pod.namespace"


@dataclass(frozen=True)
class Rule:
    text: str
    pattern: str
    owner: int | None = None
    uid: int | None = None
    gid: int | None = None
    label: tuple[str, str] | None = None
    namespace: str | None = None
    ops: tuple[str, ...] = DEFAULT_RULE_OPS

    def grants(self, caller: Caller) -> bool:
        """Whether the rule's grantee conditions all hold for ``caller`` (and there is one)."""
        if self.uid is None and self.gid is None and self.label is None and self.namespace is None:
            return False
        labels = dict(caller.labels)
        return ((self.uid is None or caller.uid == self.uid)
                and (self.gid is None or caller.in_group(self.gid))
                and (self.label is None or labels.get(self.label[0]) == self.label[1])
                and (self.namespace is None or labels.get(NAMESPACE_LABEL) == self.namespace))

    def matches(self, channel: str) -> bool:
        return channel_matches(channel, (self.pattern,)) is not None


def parse_rule(text: str) -> Rule:
    """One ``channel_rules`` entry; :class:`SettingError` naming the entry when it is wrong."""
    parts = text.split()
    if not parts:
        raise SettingError("channel_rules: empty rule")
    fields: dict = {}
    for part in parts[1:]:
        key, sep, value = part.partition("=")
        if not sep or not value:
            raise SettingError(f"channel_rules {text!r}: {part!r} is not key=value")
        where = f"channel_rules {text!r}"
        if key in ("owner", "uid"):
            fields[key] = resolve_user(where, value)
        elif key == "gid":
            fields[key] = resolve_group(where, value)
        elif key == "label":
            lk, lsep, lv = value.partition("=")
            if not lsep:
                raise SettingError(f"{where}: label= needs KEY=VALUE")
            fields["label"] = (lk, lv)
        elif key == "namespace":
            fields["namespace"] = value
        elif key == "ops":
            ops = tuple(o for o in value.split(",") if o)
            bad = [o for o in ops if o not in RULE_OPS]
            if bad:
                raise SettingError(f"{where}: unknown ops {bad}; known: {', '.join(RULE_OPS)}")
            fields["ops"] = ops
        elif key == "serviceaccount":
            raise SettingError(f"{where}: service accounts are not visible to the daemon (it has "
                               f"no Kubernetes API access); use namespace= or label=")
        else:
            raise SettingError(f"{where}: unknown key {key!r}; known: owner, uid, gid, label, "
                               f"namespace, ops")
    return Rule(text=text, pattern=parts[0], **fields)
