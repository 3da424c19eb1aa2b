"""The container engine, as the daemon asks it: a container's labels, and which containers died.

:class:`DockerLabelSource` reads labels through the ``docker`` SDK (an optional dependency,
imported lazily); :class:`StaticLabelSource` serves a fixed table (tests, and daemons configured
without an engine).  :func:`watch_container_deaths` is the one function here that runs (in a
thread its caller gives it); it never raises into its caller.  Nothing here decides access:
that is :mod:`.label_policy`.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Mapping, Protocol, runtime_checkable

log = logging.getLogger("shimmy.daemon.containers")


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
