"""Creating, sizing, retiring and sweeping the daemon's shared-memory objects.

Every object this daemon creates is named ``shimmy.<daemon id>.<channel token>[...]`` where the
daemon id is a hash of its control socket path, so two daemons on one machine (tests, nodes in
namespaces) never touch each other's objects, and a restarted daemon finds exactly what its
predecessor left.  The daemon is the only process that unlinks them.
"""

from __future__ import annotations

import hashlib
import logging
import mmap
import os

import posix_ipc

from shimmy import ring
from shimmy.errors import LimitExceeded

log = logging.getLogger("shimmy.daemon")


def daemon_id(socket_path: str) -> str:
    return hashlib.blake2b(os.path.realpath(socket_path).encode(), digest_size=4).hexdigest()


class Segments:
    def __init__(self, socket_path: str, shm_dir: str, reserve: int, budget: int):
        self.prefix = f"shimmy.{daemon_id(socket_path)}."
        self.shm_dir = shm_dir
        self.reserve = reserve
        self.budget = budget
        self.allocated = 0

    def ring_name(self, token: str) -> str:
        return "/" + self.prefix + token

    def sem_prefix(self, token: str) -> str:
        return "/" + self.prefix + token + ".s"

    def create_ring(self, token: str, name: str, mode: int, capacity: int,
                    max_subscribers: int) -> tuple[str, mmap.mmap]:
        """A pub/sub ring (layout: shimmy/ring.py), space-checked, allocated and formatted."""
        shm_name, mm = self._allocate(token, f"channel {name!r}",
                                      ring.segment_size(capacity, max_subscribers))
        ring.format_ring(mm, name, mode, capacity, max_subscribers)
        return shm_name, mm

    def create_stream(self, token: str, name: str, capacity: int) -> tuple[str, mmap.mmap]:
        """A byte-stream segment (layout: shimmy/stream_ring.py), checked and pre-faulted like a
        ring.  Its two semaphores are ``sem_prefix(token) + "r"`` / ``+ "w"`` (made by the
        caller); ``destroy(token, mm, 0)`` retires and unlinks the segment."""
        from shimmy import stream_ring
        shm_name, mm = self._allocate(token, f"stream {name!r}", stream_ring.segment_size(capacity))
        stream_ring.format_stream(mm, name, capacity)
        return shm_name, mm

    def _allocate(self, token: str, what: str, size: int) -> tuple[str, mmap.mmap]:
        """Check the budget and free space, create the object and allocate every page of it."""
        if self.budget and self.allocated + size > self.budget:
            raise LimitExceeded(f"{what} needs {size} bytes; shm_budget {self.budget} has "
                                f"{self.budget - self.allocated} left")
        st = os.statvfs(self.shm_dir)
        free = st.f_bavail * st.f_frsize
        if free - size < self.reserve:
            raise LimitExceeded(
                f"{what} needs {size} bytes but {self.shm_dir} has {free} free and "
                f"shm_reserve keeps {self.reserve}; raise the tmpfs size (docker shm_size) or "
                f"lower the capacity")
        shm_name = self.ring_name(token)
        shm = posix_ipc.SharedMemory(shm_name, posix_ipc.O_CREX, mode=0o666, size=0)
        try:
            try:
                # Allocate every page now: a full tmpfs fails here with ENOSPC, not with SIGBUS in
                # a client later.
                os.posix_fallocate(shm.fd, 0, size)
            except OSError as exc:
                raise LimitExceeded(f"{what}: cannot allocate {size} bytes in "
                                    f"{self.shm_dir}: {exc.strerror}") from None
            mm = mmap.mmap(shm.fd, size)
        except BaseException:
            shm.close_fd()
            posix_ipc.unlink_shared_memory(shm_name)
            raise
        shm.close_fd()
        self.allocated += size
        return shm_name, mm

    def create_semaphore(self, token: str, slot: int) -> None:
        sem = posix_ipc.Semaphore(self.sem_prefix(token) + str(slot), posix_ipc.O_CREAT,
                                  mode=0o666, initial_value=0)
        sem.close()

    def destroy(self, token: str, mm: mmap.mmap | None, slots: int) -> None:
        """Retire and unlink a ring and its semaphores.  Clients still mapping it see retired=1."""
        if mm is not None:
            size = len(mm)
            view = memoryview(mm).cast("Q")
            view[ring.OFF_RETIRED // 8] = 1
            view.release()
            self.allocated -= size
            try:
                mm.close()
            except BufferError:
                pass  # a view is still exported in this process; the mapping dies with it
        _unlink_shm(self.ring_name(token))
        for slot in range(slots):
            _unlink_sem(self.sem_prefix(token) + str(slot))

    def sweep(self) -> int:
        """Retire and unlink every object an earlier run of this daemon left; return the count."""
        count = 0
        try:
            entries = os.listdir(self.shm_dir)
        except OSError:
            return 0
        for entry in entries:
            if entry.startswith(self.prefix):
                _retire_file(os.path.join(self.shm_dir, entry))
                _unlink_shm("/" + entry)
                count += 1
            elif entry.startswith("sem." + self.prefix):
                _unlink_sem("/" + entry[4:])
                count += 1
        if count:
            log.info("swept %d shared-memory objects left by an earlier run", count)
        return count


def _retire_file(path: str) -> None:
    """Mark an orphaned ring retired so clients of the dead daemon stop using it."""
    try:
        with open(path, "r+b") as fh:
            mm = mmap.mmap(fh.fileno(), 0)
            try:
                # A stream segment (shimmy/stream_ring.py) has its retired word at the same +40.
                if len(mm) >= ring.CONTROL_SIZE and int.from_bytes(mm[0:8], "little") in (
                        ring.MAGIC, 0x4D525453594D4853):  # b"SHMYRING", b"SHMYSTRM"
                    mm[ring.OFF_RETIRED:ring.OFF_RETIRED + 8] = (1).to_bytes(8, "little")
            finally:
                mm.close()
    except (OSError, ValueError):
        pass


def _unlink_shm(name: str) -> None:
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        pass


def _unlink_sem(name: str) -> None:
    try:
        posix_ipc.unlink_semaphore(name)
    except posix_ipc.ExistentialError:
        pass
