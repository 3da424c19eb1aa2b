"""Clients leaving, however they leave: a clean goodbye, a crash (the session socket closed), a
lease missed (its slots evicted), silence past session_timeout (an orphan: its session closed,
its roles kept until its process exits, watched by a pidfd), or its container dying (the Docker
watcher thread).  Each departure frees what the client held in the registry and the streams.

It must never free the slots or role of a silent client whose process still lives (one writer
per word: an orphan's slots stay EVICTED until its pidfd says it exited, as it may wake up and
write to them), and the watcher thread never touches the daemon's state: it only queues the
event for the loop.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import TYPE_CHECKING

from . import containers
from .sessions import Client

if TYPE_CHECKING:
    from .server import Daemon

log = logging.getLogger("shimmy.daemon")
DOCKER_SOCKET = "/var/run/docker.sock"


class Departures:
    def __init__(self, d: Daemon):
        self.d = d
        self.orphans: dict[int, Client] = {}     # pidfd -> silent client whose session we closed
        self._deaths: "queue.SimpleQueue[str]" = queue.SimpleQueue()
        self.death_fd, self._death_w = os.pipe()   # the loop polls death_fd
        os.set_blocking(self.death_fd, False)
        os.set_blocking(self._death_w, False)
        self._stop_watch = threading.Event()
        if os.path.exists(DOCKER_SOCKET):
            threading.Thread(target=containers.watch_container_deaths, name="container-deaths",
                             args=(self._on_container_death, self._stop_watch),
                             daemon=True).start()

    def expired(self, now: float) -> None:
        """Housekeeping: the clients whose lease lapsed, whose session went, or which fell
        silent (daemon/sessions.py decides which)."""
        d = self.d
        lapsed, ghosts, silent = d.sessions.expired(now)
        for client in lapsed:
            n = d.registry.evict_client_slots(client.id)
            d.counters["leases_expired"] += 1
            log.warning("client %d pid=%s missed heartbeats for lease_timeout=%.1fs: evicted %d "
                        "subscriber slots", client.id, client.pid, d.settings.lease_timeout, n)
        for client in ghosts:
            self.client_gone(client, crashed=False)
        for client in silent:
            self.orphan(client)

    def client_gone(self, client: Client, crashed: bool) -> None:
        slots, roles = self.d.registry.drop_client(client.id)
        self.d.streams.drop_client(client.id)
        self.d.callers.tenants.pop(client.id, None)
        self.d.counters["slots_reclaimed"] += slots
        self.d.counters["clients_crashed" if crashed else "clients_exited"] += 1
        log.info("client %d pid=%s gone: freed %d slots, %d publisher roles", client.id,
                 client.pid, slots, roles)

    def orphan(self, client: Client) -> None:
        """A client silent for session_timeout: its session is closed and it no longer counts
        as a client.  While its process lives, its EVICTED slots and publisher role stay
        reserved (it may wake up and write to them: one writer per word); a pidfd tells the
        loop when it exits."""
        fd = None
        if client.pid:
            try:
                fd = os.pidfd_open(client.pid)
            except (OSError, AttributeError):
                fd = None
        log.warning("client %d pid=%s silent for session_timeout=%.1fs: session closed%s",
                    client.id, client.pid, self.d.settings.session_timeout,
                    "; its slots stay reserved until it exits" if fd is not None else "")
        if fd is None:
            self.client_gone(client, crashed=False)
        else:
            self.orphans[fd] = client

    def exited(self, fd: int) -> None:
        client = self.orphans.pop(fd)
        os.close(fd)
        self.client_gone(client, crashed=True)

    def _on_container_death(self, container_id: str) -> None:
        """Watcher thread: hand the event to the loop thread (the only one touching state)."""
        self._deaths.put(container_id)
        try:
            os.write(self._death_w, b"d")
        except BlockingIOError:
            pass

    def drain(self) -> None:
        try:
            os.read(self.death_fd, 4096)
        except BlockingIOError:
            pass
        while not self._deaths.empty():
            cid = self._deaths.get()
            self.d.callers.labels.forget(cid)
            for client in list(self.d.sessions.clients.values()):
                if client.container == cid:
                    log.info("container %s died: reclaiming client %d", cid[:12], client.id)
                    self.d.sessions.disconnect(client)
                    self.client_gone(client, crashed=True)

    def close(self) -> None:
        """Stop the watcher thread and close the orphans' pidfds (the daemon is stopping)."""
        self._stop_watch.set()
        for fd in self.orphans:
            os.close(fd)
        self.orphans.clear()
