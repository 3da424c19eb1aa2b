"""Who is on the other end of the control socket, and what may it do.

The identity chain (see ``docs/containers.md``):

1. **Peer credentials.**  The kernel tells the daemon the pid of the process that connected to its
   unix socket (``SO_PEERCRED``, :func:`peer_credentials`).  The pid is translated into the
   daemon's pid namespace, so the daemon must share the host's (compose ``pid: host``, Kubernetes
   ``hostPID``) for the pid to mean anything; a peer in a pid namespace the daemon cannot see
   arrives as pid 0.
2. **cgroup.**  ``/proc/<pid>/cgroup`` names the container the process runs in
   (:func:`container_id_of_pid`).
3. **Labels.**  The container engine knows the container's labels (:class:`DockerLabelSource`).
   ``shimmy.publish`` and ``shimmy.subscribe`` hold comma-separated channel patterns
   (:func:`compile_pattern`), which :class:`AccessPolicy` checks on every channel operation.

This module says who a client is and what its container labels allow; ownership and the
uid/group rules are decided after it, in :mod:`access` (``docs/security.md``).  Under ``access``
``owner`` (the default) and ``open``, a process outside any container, a process the daemon
cannot identify, and a container without a ``shimmy.publish`` or ``shimmy.subscribe`` label pass
this layer; a container with either label may do exactly what its labels list.  With ``access =
"closed"`` only what a label grants passes.

Everything here is pure: no daemon loop, no global state except the label cache of one
:class:`DockerLabelSource`.  :func:`watch_container_deaths` is the one function that runs
(in a thread the caller gives it) and it never raises into its caller.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Protocol, runtime_checkable

from shimmy.errors import InvalidArgument, PermissionDenied

UNRESTRICTED = "no label restricts it (access is not closed)"
log = logging.getLogger("shimmy.daemon.identity")

PUBLISH_LABEL = "shimmy.publish"
SUBSCRIBE_LABEL = "shimmy.subscribe"
#: Channel operation -> the label that grants it.  A stream writer is a publisher and a stream
#: reader a subscriber, so the daemon checks ``"publish"`` / ``"subscribe"`` for streams too.
OP_LABELS: dict[str, str] = {"publish": PUBLISH_LABEL, "subscribe": SUBSCRIBE_LABEL}
POLICY_LABELS = frozenset(OP_LABELS.values())

# --------------------------------------------------------------------------------------------
# 1. peer credentials
# --------------------------------------------------------------------------------------------

_UCRED = struct.Struct("3i")  # struct ucred {pid_t pid; uid_t uid; gid_t gid;}


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the peer of a connected ``AF_UNIX`` socket (Linux ``SO_PEERCRED``).

    The pid is in the daemon's pid namespace; 0 means the peer lives in a pid namespace the
    daemon cannot see (run the daemon with the host's pid namespace to identify containers).
    """
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def supplementary_groups(pid: int | None, proc_root: str = "/proc") -> frozenset[int]:
    """The supplementary groups of process ``pid`` (``Groups:`` in ``/proc/<pid>/status``);
    empty when the pid is unknown or its status cannot be read (other pid namespace)."""
    if not isinstance(pid, int) or pid <= 0:
        return frozenset()
    try:
        with open(os.path.join(proc_root, str(pid), "status"), encoding="ascii",
                  errors="replace") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:] if g.isdigit())
    except OSError:
        pass
    return frozenset()


# --------------------------------------------------------------------------------------------
# 2. /proc/<pid>/cgroup -> container id
# --------------------------------------------------------------------------------------------

_HEX64 = r"([0-9a-f]{64})"
# Each pattern is searched in the cgroup *path* of every line of /proc/<pid>/cgroup.  The path
# may start with "/.." segments when the reader is in another cgroup namespace, and may nest
# (docker in docker): the last match in a path is the innermost container, the one the process
# actually runs in.
_CONTAINER_PATTERNS: tuple[re.Pattern[str], ...] = (
    re.compile(r"/docker/" + _HEX64 + r"(?=/|$)"),                 # docker, cgroupfs driver
    re.compile(r"docker-" + _HEX64 + r"\.scope"),                  # docker, systemd driver
    re.compile(r"cri-containerd-" + _HEX64 + r"\.scope"),          # containerd CRI, systemd
    re.compile(r"crio-(?:conmon-)?" + _HEX64 + r"(?:\.scope)?(?=/|$)"),  # CRI-O
    re.compile(r"libpod-(?:conmon-)?" + _HEX64 + r"(?:\.scope)?(?=/|$)"),  # podman
    # Kubernetes with the cgroupfs driver: /kubepods[/<qos>]/pod<uid>/<id>
    re.compile(r"/kubepods(?:/[a-z]+)?/pod[0-9a-f_-]+/" + _HEX64 + r"(?=/|$)"),
)


def container_id_from_cgroup(text: str) -> str | None:
    """The container id named in the contents of a ``/proc/<pid>/cgroup`` file, or ``None``.

    Understands cgroup v1 (``N:controllers:path`` lines) and v2 (``0::path``), the docker
    cgroupfs (``/docker/<id>``) and systemd (``docker-<id>.scope``) layouts, containerd
    (``cri-containerd-<id>.scope``), CRI-O (``crio-<id>``), podman (``libpod-<id>``) and
    kubepods cgroupfs paths.  ``..`` segments (a reader in another cgroup namespace) are fine.
    """
    best: tuple[int, str] | None = None  # (position in path, id): prefer the innermost
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        path = parts[2].strip()
        for pattern in _CONTAINER_PATTERNS:
            for match in pattern.finditer(path):
                candidate = (match.start(1), match.group(1))
                if best is None or candidate[0] > best[0]:
                    best = candidate
        if best is not None:
            # every hierarchy of one process names the same container; the first line that
            # names one is enough (the loop still picks the innermost within that line)
            return best[1]
    return None


def container_id_of_pid(pid: int, proc_root: str = "/proc") -> str | None:
    """The id (64 hex digits) of the container process ``pid`` runs in, or ``None``.

    ``None`` means: not in a container, the process is gone, or ``/proc/<pid>/cgroup`` cannot be
    read (another pid namespace, ``hidepid``).  Never raises for a missing or unreadable file.
    """
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        with open(os.path.join(proc_root, str(pid), "cgroup"), encoding="utf-8",
                  errors="replace") as f:
            text = f.read(1 << 16)
    except OSError:
        return None
    return container_id_from_cgroup(text)


# --------------------------------------------------------------------------------------------
# 3. labels
# --------------------------------------------------------------------------------------------


@runtime_checkable
class LabelSource(Protocol):
    """Where the daemon reads a container's labels.

    ``labels(container_id)`` returns the container's labels, or ``None`` when they cannot be
    known (engine unreachable, container unknown to this engine, for example a Kubernetes
    container on a node without docker).  An implementation may also offer
    ``name(container_id) -> str | None`` for friendlier error messages.
    """

    def labels(self, container_id: str) -> dict[str, str] | None: ...


class StaticLabelSource:
    """Labels from a mapping ``{container_id: {label: value}}``: for tests and for a daemon
    configured with a fixed table instead of a container engine."""

    def __init__(self, table: Mapping[str, Mapping[str, str]] | None = None,
                 names: Mapping[str, str] | None = None) -> None:
        self._table = {k: dict(v) for k, v in (table or {}).items()}
        self._names = dict(names or {})

    def labels(self, container_id: str) -> dict[str, str] | None:
        found = self._table.get(container_id)
        return dict(found) if found is not None else None

    def name(self, container_id: str) -> str | None:
        return self._names.get(container_id)


class DockerLabelSource:
    """Container labels from the Docker engine, through the ``docker`` SDK (imported lazily, so
    the daemon runs without it).  Answers are cached for ``ttl`` seconds, failures included, so a
    burst of connections costs one API call; labels never change during a container's life, so
    the cache only matters for memory and for ids that are reused (never, in practice).

    Returns ``None`` when the SDK is not installed, the engine does not answer within ``timeout``
    seconds, or it does not know the container.  ``base_url`` defaults to ``DOCKER_HOST`` or the
    local socket, like the docker CLI.
    """

    def __init__(self, base_url: str | None = None, ttl: float = 30.0, timeout: float = 2.0,
                 max_entries: int = 4096) -> None:
        self._base_url = base_url
        self._ttl = ttl
        self._timeout = timeout
        self._max = max_entries
        self._lock = threading.Lock()
        self._cache: dict[str, tuple[float, dict[str, str] | None, str | None]] = {}
        self._client = None
        self._client_failed_at: float | None = None

    def _docker(self):
        """A docker client, or None; a failed connect is retried after ``ttl`` seconds."""
        if self._client is not None:
            return self._client
        now = time.monotonic()
        if self._client_failed_at is not None and now - self._client_failed_at < self._ttl:
            return None
        try:
            import docker  # lazy: optional dependency (pip install shimmy[daemon])

            if self._base_url:
                client = docker.DockerClient(base_url=self._base_url, timeout=self._timeout)
            else:
                client = docker.from_env(timeout=self._timeout)
            client.ping()
        except Exception as exc:  # ImportError, DockerException, connection errors
            log.info("docker labels unavailable: %s", exc)
            self._client_failed_at = now
            return None
        self._client = client
        return client

    def _lookup(self, container_id: str) -> tuple[dict[str, str] | None, str | None]:
        now = time.monotonic()
        with self._lock:
            hit = self._cache.get(container_id)
            if hit is not None and now - hit[0] < self._ttl:
                return hit[1], hit[2]
        labels: dict[str, str] | None = None
        name: str | None = None
        client = self._docker()
        if client is not None:
            try:
                info = client.api.inspect_container(container_id)
                labels = dict((info.get("Config") or {}).get("Labels") or {})
                name = (info.get("Name") or "").lstrip("/") or None
            except Exception as exc:  # NotFound, APIError, timeouts: unknown labels
                log.info("no labels for container %s: %s", container_id[:12], exc)
        with self._lock:
            if len(self._cache) >= self._max:
                self._cache.clear()
            self._cache[container_id] = (now, labels, name)
        return labels, name

    def labels(self, container_id: str) -> dict[str, str] | None:
        return self._lookup(container_id)[0]

    def name(self, container_id: str) -> str | None:
        return self._lookup(container_id)[1]

    def forget(self, container_id: str) -> None:
        """Drop a cached answer (the daemon calls it when the container dies)."""
        with self._lock:
            self._cache.pop(container_id, None)


# --------------------------------------------------------------------------------------------
# 4. channel patterns and the policy
# --------------------------------------------------------------------------------------------

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
class AccessPolicy:
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
                  container_id: str | None = None) -> "AccessPolicy":
        return cls(subject=subject, default_allow=True, default_reason=reason,
                   container_id=container_id)

    @classmethod
    def deny_all(cls, subject: str, reason: str,
                 container_id: str | None = None) -> "AccessPolicy":
        return cls(subject=subject, default_allow=False, default_reason=reason,
                   container_id=container_id)

    @classmethod
    def from_labels(cls, subject: str, labels: Mapping[str, str] | None, default_open: bool,
                    container_id: str | None = None) -> "AccessPolicy":
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
                         default_open: bool, pid: int | None = None) -> AccessPolicy:
    """The policy of a client already identified (``container_id`` ``None``: not in a
    container)."""
    if container_id is None:
        subject = f"process {pid} (outside any container)" if pid else "client"
        if default_open:
            return AccessPolicy.allow_all(subject, f"not in a container; {UNRESTRICTED}")
        return AccessPolicy.deny_all(
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
    return AccessPolicy.from_labels(subject, labels, default_open, container_id=container_id)


def policy_for_pid(pid: int | None, label_source: LabelSource | None, default_open: bool,
                   proc_root: str = "/proc") -> AccessPolicy:
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
            return AccessPolicy.allow_all(subject, f"{reason}; {UNRESTRICTED}")
        return AccessPolicy.deny_all(subject, reason + "; --access closed")
    if not os.path.exists(os.path.join(proc_root, str(pid))):
        subject = f"process {pid}"
        reason = f"{proc_root}/{pid} does not exist in the daemon's view"
        if default_open:
            return AccessPolicy.allow_all(subject, f"{reason}; {UNRESTRICTED}")
        return AccessPolicy.deny_all(subject, reason + "; --access closed")
    cid = container_id_of_pid(pid, proc_root)
    return policy_for_container(cid, label_source, default_open, pid=pid)


# --------------------------------------------------------------------------------------------
# 5. container deaths
# --------------------------------------------------------------------------------------------


def watch_container_deaths(callback: Callable[[str], None], stop_event: threading.Event,
                           base_url: str | None = None, poll: float = 1.0,
                           retry: float = 5.0) -> None:
    """Call ``callback(container_id)`` for every container that dies, until ``stop_event``.

    Meant as the target of a daemon thread::

        threading.Thread(target=watch_container_deaths, args=(on_death, stop), daemon=True)

    Uses docker's event stream (``type=container``, ``event=die``) in windows of ``poll``
    seconds (``since``/``until``), so it notices ``stop_event`` within about ``poll`` seconds and
    never misses an event between windows.  If the SDK or the engine is missing it retries every
    ``retry`` seconds.  It never raises: errors (including the callback's) are logged.
    """
    client = None
    since: float | None = None
    while not stop_event.is_set():
        if client is None:
            try:
                import docker  # lazy: optional dependency

                client = (docker.DockerClient(base_url=base_url, timeout=max(5.0, 2 * poll))
                          if base_url else docker.from_env(timeout=max(5.0, 2 * poll)))
                client.ping()
                # first connect: start a little in the past so a death while connecting is not
                # missed; after a reconnect: go on from the last window (the engine replays)
                if since is None:
                    since = time.time() - 1.0
            except Exception as exc:
                log.info("container death watch: docker unavailable (%s); retrying in %.0fs",
                         exc, retry)
                client = None
                stop_event.wait(retry)
                continue
        until = time.time() + poll
        try:
            # timestamps as "seconds.nanoseconds" strings, the form the engine parses exactly
            events = client.events(decode=True, since=f"{since:.9f}", until=f"{until:.9f}",
                                   filters={"type": "container", "event": "die"})
            try:
                for ev in events:
                    cid = ev.get("id") or (ev.get("Actor") or {}).get("ID")
                    if cid:
                        try:
                            callback(cid)
                        except Exception:
                            log.exception("container death callback failed for %s", cid[:12])
            finally:
                # Each window is its own HTTP stream: close it, or its connection to the engine
                # stays open until garbage collection (one descriptor per window).
                close = getattr(events, "close", None)
                if callable(close):
                    close()
            # the next window starts where this one ended; an event stamped exactly on the
            # boundary may be reported twice, so callbacks must be idempotent
            since = until
        except Exception as exc:
            log.info("container death watch: event stream failed (%s); reconnecting", exc)
            try:
                client.close()
            except Exception:
                pass
            client = None
            stop_event.wait(min(retry, 1.0))
            continue
        # events() with until returns when `until` passes; guard against a server that returns
        # early so the loop never spins
        remaining = until - time.time()
        if remaining > 0:
            stop_event.wait(remaining)
    if client is not None:
        try:
            client.close()
        except Exception:
            pass
