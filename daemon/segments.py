"""Creating, sizing, retiring and sweeping the daemon's shared-memory objects.

Every object this daemon creates is named ``shimmy.<daemon id>.<channel token>[...]`` where the
daemon id is a hash of its control socket path, so two daemons on one machine (tests, nodes in
namespaces) never touch each other's objects, and a restarted daemon finds exactly what its
predecessor left.  The daemon is the only process that unlinks them.

Ownership and mode are never left to the umask: each object is created 0600 (so it is private
from the first instant), then given its owner, group and mode with ``fchown``/``fchmod`` on its
own descriptor (:meth:`Segments.claim` says what a channel's objects get, see
``daemon/access.py``).  Running out of space anywhere (``ENOSPC``, ``ENOMEM``) is
:class:`~shimmy.errors.LimitExceeded` naming the bytes asked for and free.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import mmap
import os
from typing import TYPE_CHECKING

import posix_ipc

from shimmy import ring
from shimmy.errors import LimitExceeded

if TYPE_CHECKING:
    from .access import Ownership

log = logging.getLogger("shimmy.daemon")
SEM_DIR = "/dev/shm"  # where glibc keeps named semaphores, whatever shm_dir says
ROOM_SUFFIX = "room"  # after sem_prefix: a ring's room semaphore (Segments.room_sem)
CREATE_MODE = 0o600  # every object starts private; its real mode is set explicitly after


def daemon_id(socket_path: str) -> str:
    return hashlib.blake2b(os.path.realpath(socket_path).encode(), digest_size=4).hexdigest()


class Segments:
    def __init__(self, socket_path: str, shm_dir: str, reserve: int, budget: int):
        self.prefix = f"shimmy.{daemon_id(socket_path)}."
        self.shm_dir = shm_dir
        self.reserve = reserve
        self.budget = budget
        self.allocated = 0
        self._owners: dict[str, Ownership] = {}
        self.default: Ownership | None = None   # objects of tokens nobody claimed

    def claim(self, token: str, ownership: "Ownership") -> None:
        """The objects made for ``token`` from now on (ring, semaphores) get ``ownership``."""
        self._owners[token] = ownership

    def unclaim(self, token: str) -> None:
        self._owners.pop(token, None)

    def ownership(self, token: str) -> "Ownership | None":
        return self._owners.get(token, self.default)

    def free_bytes(self) -> int:
        try:
            st = os.statvfs(self.shm_dir)
        except OSError:
            return -1
        return st.f_bavail * st.f_frsize

    def _apply(self, token: str, fd: int) -> None:
        """Give the object behind ``fd`` its owner, group and mode (whatever the umask)."""
        own = self.ownership(token)
        if own is None:
            return
        if own.file_uid != -1 or own.file_gid != -1:
            os.fchown(fd, own.file_uid, own.file_gid)
        os.fchmod(fd, own.mode)

    def ring_name(self, token: str) -> str:
        return "/" + self.prefix + token

    def sem_prefix(self, token: str) -> str:
        return "/" + self.prefix + token + ".s"

    def room_sem(self, token: str) -> str:
        """The ring's room semaphore, which its publisher sleeps on while it waits for room
        (spec/ring.md, "Waiting for room"): ``sem_prefix(token) + "room"``, apart from every
        slot's (``+ <digits>``) and a stream's (``+ "r"``, ``+ "w"``)."""
        return self.sem_prefix(token) + ROOM_SUFFIX

    def create_ring(self, token: str, name: str, mode: int, capacity: int,
                    max_subscribers: int) -> tuple[str, mmap.mmap]:
        """A pub/sub ring (shimmy/ring/layout.py), space-checked, allocated and formatted, and
        its room semaphore (``room_sem``)."""
        self.open_semaphore(token, ROOM_SUFFIX).close()
        try:
            shm_name, mm = self._allocate(token, f"channel {name!r}",
                                          ring.segment_size(capacity, max_subscribers))
        except BaseException:
            _unlink_sem(self.room_sem(token))
            raise
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
        free = self.free_bytes()
        if free - size < self.reserve:
            raise LimitExceeded(
                f"{what} needs {size} bytes but {self.shm_dir} has {free} free and "
                f"shm_reserve keeps {self.reserve}; raise the tmpfs size (docker shm_size) or "
                f"lower the capacity")
        shm_name = self.ring_name(token)
        try:
            shm = posix_ipc.SharedMemory(shm_name, posix_ipc.O_CREX, mode=CREATE_MODE, size=0)
        except OSError as exc:
            raise self._no_space(what, size, exc) from None
        try:
            try:
                # Allocate every page now: a full tmpfs fails here with ENOSPC, not with SIGBUS in
                # a client later.
                os.posix_fallocate(shm.fd, 0, size)
            except OSError as exc:
                raise self._no_space(what, size, exc) from None
            self._apply(token, shm.fd)
            mm = mmap.mmap(shm.fd, size)
        except BaseException:
            shm.close_fd()
            posix_ipc.unlink_shared_memory(shm_name)
            raise
        shm.close_fd()
        self.allocated += size
        return shm_name, mm

    def _no_space(self, what: str, size: int, exc: OSError) -> Exception:
        if exc.errno in (errno.EMFILE, errno.ENFILE):
            return LimitExceeded(f"{what}: the daemon is out of file descriptors "
                                 f"({exc.strerror}); try again")
        if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EDQUOT):
            return LimitExceeded(f"{what}: cannot allocate {size} bytes in {self.shm_dir}: "
                                 f"{exc.strerror}; {self.free_bytes()} bytes free there (raise "
                                 f"the tmpfs size, docker shm_size, or lower the capacity)")
        return exc

    def create_semaphore(self, token: str, slot: int) -> None:
        """Create subscriber slot ``slot``'s semaphore, owned like the token's ring."""
        self.open_semaphore(token, str(slot)).close()

    def open_semaphore(self, token: str, suffix: str) -> posix_ipc.Semaphore:
        """Create the semaphore ``sem_prefix(token) + suffix``, owned and moded like the rest of
        the token's objects; return it open."""
        name = self.sem_prefix(token) + suffix
        try:
            sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX, mode=CREATE_MODE, initial_value=0)
        except posix_ipc.ExistentialError:
            # Left by a subscriber slot created before (semaphores outlive unsubscribes).
            sem = posix_ipc.Semaphore(name)
        except OSError as exc:
            raise self._no_space(f"semaphore {name}", 32, exc) from None
        try:
            # A semaphore has no descriptor of its own: open its file (never following a link)
            # to fchown/fchmod it.
            fd = os.open(os.path.join(SEM_DIR, "sem." + name.lstrip("/")),
                         os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            try:
                self._apply(token, fd)
            finally:
                os.close(fd)
        except BaseException:
            sem.close()
            _unlink_sem(name)
            raise
        return sem

    def destroy(self, token: str, mm: mmap.mmap | None, slots: int) -> None:
        """Retire and unlink a ring and its semaphores.  Clients still mapping it see retired=1."""
        if mm is not None:
            self._retire(mm)
        _unlink_shm(self.ring_name(token))
        self._owners.pop(token, None)
        _unlink_sem(self.room_sem(token))
        for slot in range(slots):
            _unlink_sem(self.sem_prefix(token) + str(slot))

    def _retire(self, mm: mmap.mmap) -> None:
        """Set the segment's retired word (clients still mapping it stop using it), then unmap
        it and give its bytes back to the budget."""
        size = len(mm)
        view = memoryview(mm).cast("Q")
        view[ring.W_RETIRED] = 1
        view.release()
        self.allocated -= size
        try:
            mm.close()
        except BufferError:
            pass  # a view is still exported in this process; the mapping dies with it

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
