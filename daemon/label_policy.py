"""What a container's labels allow: channel patterns and the :class:`LabelPolicy`.

Containers carry ``shimmy.publish`` and ``shimmy.subscribe`` labels holding comma-separated
channel patterns (:func:`compile_pattern`); :class:`LabelPolicy` checks them on every channel
operation.  Under ``access`` ``owner`` (the default) and ``open``, a process outside any
container, a process the daemon cannot identify, and a container without a ``shimmy.publish`` or
``shimmy.subscribe`` label pass this layer; a container with either label may do exactly what its
labels list.  With ``access = "closed"`` only what a label grants passes.  Ownership and the
uid/group rules are decided after it, in :mod:`.access` (``docs/security.md``).

Pure: no daemon loop and no state but a cache of compiled patterns.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Mapping

from shimmy.errors import InvalidArgument, PermissionDenied

from .containers import LabelSource
from .identity import container_id_of_pid

UNRESTRICTED = "no label restricts it (access is not closed)"
log = logging.getLogger("shimmy.daemon.label_policy")

PUBLISH_LABEL = "shimmy.publish"
SUBSCRIBE_LABEL = "shimmy.subscribe"
#: Channel operation -> the label that grants it.  A stream writer is a publisher and a stream
#: reader a subscriber, so the daemon checks ``"publish"`` / ``"subscribe"`` for streams too.
OP_LABELS: dict[str, str] = {"publish": PUBLISH_LABEL, "subscribe": SUBSCRIBE_LABEL}
POLICY_LABELS = frozenset(OP_LABELS.values())


_PATTERN_CACHE: dict[str, re.Pattern[str]] = {}


def compile_pattern(pattern: str) -> re.Pattern[str]:
    """Compile one channel pattern.

    Channel names are ``/``-separated segments.  In a pattern:

    - ``*`` matches any run of characters inside one segment (it never crosses ``/``);
    - ``**`` matches any run of characters, ``/`` included (any depth);
    - ``?`` matches one character other than ``/``;
    - ``[abc]``, ``[a-z]``, ``[!abc]`` match one character of (not of) a set, never ``/``;
    - everything else matches itself.

    So ``sensors/*`` matches ``sensors/temp`` but not ``sensors/a/b`` nor ``sensors``;
    ``sensors/**`` matches both ``sensors/temp`` and ``sensors/a/b``; ``**`` matches everything.
    The whole name must match.
    """
    cached = _PATTERN_CACHE.get(pattern)
    if cached is not None:
        return cached
    out: list[str] = []
    i, n = 0, len(pattern)
    while i < n:
        c = pattern[i]
        if c == "*":
            if i + 1 < n and pattern[i + 1] == "*":
                out.append(".*")
                i += 2
                while i < n and pattern[i] == "*":  # *** is the same as **
                    i += 1
                continue
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "[":
            j = i + 1
            if j < n and pattern[j] in "!^":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            while j < n and pattern[j] != "]":
                j += 1
            if j >= n:  # no closing bracket: a literal "["
                out.append(re.escape(c))
            else:
                body = pattern[i + 1:j]
                negate = body[:1] in ("!", "^")
                if negate:
                    body = body[1:]
                body = body.replace("\\", "\\\\")
                out.append(f"[^/{body}]" if negate else f"(?!/)[{body}]")
                i = j + 1
                continue
        else:
            out.append(re.escape(c))
        i += 1
    compiled = re.compile("".join(out) + r"\Z")
    if len(_PATTERN_CACHE) < 4096:
        _PATTERN_CACHE[pattern] = compiled
    return compiled


def parse_patterns(value: str) -> tuple[str, ...]:
    """The patterns of one label value: comma-separated, blanks around each ignored, empties
    dropped (so an empty value grants nothing)."""
    return tuple(p.strip() for p in value.split(",") if p.strip())


def channel_matches(channel: str, patterns: Iterable[str]) -> str | None:
    """The first of ``patterns`` that matches ``channel``, or ``None``."""
    for p in patterns:
        if compile_pattern(p).match(channel):
            return p
    return None


@dataclass(frozen=True)
class LabelPolicy:
    """What one client may do with channels.

    Build it with :meth:`from_labels` (a container's labels), :meth:`allow_all` or
    :meth:`deny_all`; the daemon keeps one per client connection and calls :meth:`check` before
    every channel operation.
    """

    #: who this policy is for, as error messages name it: "container 3f2a9c1d7e4b (web-1)",
    #: "process 1234 (outside any container)"
    subject: str
    #: op -> patterns; an op missing from ``rules`` falls to ``default_allow`` / ``default_reason``
    rules: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    #: the label value each rule came from, for error messages (op -> raw label value)
    sources: Mapping[str, str] = field(default_factory=dict)
    default_allow: bool = True
    #: why an op without a rule is allowed or refused (goes into the error message)
    default_reason: str = ""
    container_id: str | None = None

    # ---- constructors ------------------------------------------------------------------

    @classmethod
    def allow_all(cls, subject: str, reason: str = "labels do not restrict it",
                  container_id: str | None = None) -> "LabelPolicy":
        return cls(subject=subject, default_allow=True, default_reason=reason,
                   container_id=container_id)

    @classmethod
    def deny_all(cls, subject: str, reason: str,
                 container_id: str | None = None) -> "LabelPolicy":
        return cls(subject=subject, default_allow=False, default_reason=reason,
                   container_id=container_id)

    @classmethod
    def from_labels(cls, subject: str, labels: Mapping[str, str] | None, default_open: bool,
                    container_id: str | None = None) -> "LabelPolicy":
        """The policy a container's labels give.

        - labels with ``shimmy.publish`` and/or ``shimmy.subscribe``: each op is allowed on the
          channels its label's patterns match and refused elsewhere; an op whose label is absent
          is refused (a container that lists what it may do gets nothing more);
        - no such label (other ``shimmy.*`` labels such as ``shimmy.ci`` do not count), or labels
          unknown (``None``): everything when ``default_open``, nothing otherwise.
        """
        present = {k: v for k, v in (labels or {}).items() if k in POLICY_LABELS}
        if not present:
            if labels is None:
                why = "labels unavailable (container engine unreachable or container unknown)"
            else:
                why = f"no {PUBLISH_LABEL} or {SUBSCRIBE_LABEL} label"
            if default_open:
                return cls.allow_all(subject, f"{why}; {UNRESTRICTED}", container_id)
            return cls.deny_all(subject, f"{why}; --access closed allows only what a label "
                                         f"grants", container_id)
        rules: dict[str, tuple[str, ...]] = {}
        sources: dict[str, str] = {}
        for op, label in OP_LABELS.items():
            if label in present:
                rules[op] = parse_patterns(present[label])
                sources[op] = present[label]
        absent = ", ".join(sorted(label for label in POLICY_LABELS if label not in present))
        return cls(subject=subject, rules=rules, sources=sources, default_allow=False,
                   default_reason=f"the container has shimmy access labels but no {absent} "
                                  f"label (a labelled container gets only what its labels list)",
                   container_id=container_id)

    # ---- checking ----------------------------------------------------------------------

    def allows(self, op: str, channel: str) -> bool:
        try:
            self.check(op, channel)
        except PermissionDenied:
            return False
        return True

    def check(self, op: str, channel: str) -> None:
        """Return if ``op`` on ``channel`` is allowed, else raise :class:`PermissionDenied`
        naming the client, the op, the channel and the rule (label and value) that refused."""
        if op not in OP_LABELS:
            raise InvalidArgument(f"unknown channel operation {op!r}; known: "
                                  f"{', '.join(sorted(OP_LABELS))}")
        patterns = self.rules.get(op)
        if patterns is None:
            if self.default_allow:
                return
            raise PermissionDenied(f"{self.subject} may not {op} channel {channel!r}: "
                                   f"{self.default_reason}")
        if channel_matches(channel, patterns) is not None:
            return
        label = OP_LABELS[op]
        raise PermissionDenied(
            f"{self.subject} may not {op} channel {channel!r}: label "
            f"{label}={self.sources.get(op, ','.join(patterns))!r} has no pattern matching it "
            f"(patterns are comma-separated; '*' stays inside one '/' segment, '**' crosses)")

    def check_open(self, channel: str) -> None:
        """Opening (and so creating) a channel needs one of the ops on it: return if
        ``publish`` or ``subscribe`` is allowed, else raise :class:`PermissionDenied` naming both
        rules.  The op itself is checked again when the client publishes or subscribes."""
        refusals = []
        for op in OP_LABELS:
            try:
                self.check(op, channel)
                return
            except PermissionDenied as exc:
                refusals.append(str(exc).split(": ", 1)[1])
        raise PermissionDenied(f"{self.subject} may not open channel {channel!r} (neither "
                               f"publish nor subscribe is allowed): " + "; ".join(refusals))

    def describe(self) -> dict:
        """A JSON-able summary for ``shimmy stat``."""
        return {"subject": self.subject, "container_id": self.container_id,
                "rules": {op: list(p) for op, p in self.rules.items()},
                "default": "allow" if self.default_allow else "deny",
                "default_reason": self.default_reason}


def _short(container_id: str) -> str:
    return container_id[:12]


def policy_for_container(container_id: str | None, label_source: LabelSource | None,
                         default_open: bool, pid: int | None = None) -> LabelPolicy:
    """The policy of a client already identified (``container_id`` ``None``: not in a
    container)."""
    if container_id is None:
        subject = f"process {pid} (outside any container)" if pid else "client"
        if default_open:
            return LabelPolicy.allow_all(subject, f"not in a container; {UNRESTRICTED}")
        return LabelPolicy.deny_all(
            subject, "not in a container, so no labels grant it anything; --access closed")
    labels = None
    name = None
    if label_source is not None:
        try:
            labels = label_source.labels(container_id)
        except Exception as exc:  # a label source must not take the daemon down
            log.warning("label source failed for %s: %s", _short(container_id), exc)
        name_of = getattr(label_source, "name", None)
        if callable(name_of):
            try:
                name = name_of(container_id)
            except Exception:
                name = None
    subject = f"container {_short(container_id)}" + (f" ({name})" if name else "")
    return LabelPolicy.from_labels(subject, labels, default_open, container_id=container_id)


def policy_for_pid(pid: int | None, label_source: LabelSource | None, default_open: bool,
                   proc_root: str = "/proc") -> LabelPolicy:
    """The access policy of the client process ``pid`` (from peer credentials).

    ``pid`` ``None`` or 0 (peer outside the daemon's pid namespace) and pids whose
    ``/proc/<pid>/cgroup`` cannot be read are "unidentified": allowed everything when
    ``default_open``, refused everything otherwise (the message says to give the daemon the
    host's pid namespace).
    """
    if not pid or pid <= 0:
        subject = "unidentified client"
        reason = ("its pid is not visible to the daemon (run the daemon in the host pid "
                  "namespace: compose pid: host, Kubernetes hostPID)")
        if default_open:
            return LabelPolicy.allow_all(subject, f"{reason}; {UNRESTRICTED}")
        return LabelPolicy.deny_all(subject, reason + "; --access closed")
    if not os.path.exists(os.path.join(proc_root, str(pid))):
        subject = f"process {pid}"
        reason = f"{proc_root}/{pid} does not exist in the daemon's view"
        if default_open:
            return LabelPolicy.allow_all(subject, f"{reason}; {UNRESTRICTED}")
        return LabelPolicy.deny_all(subject, reason + "; --access closed")
    cid = container_id_of_pid(pid, proc_root)
    return policy_for_container(cid, label_source, default_open, pid=pid)
