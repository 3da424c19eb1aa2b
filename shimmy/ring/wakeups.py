"""Wake-ups: the full fence of the wake-up handshake, sleep epochs, and posting sleepers.

The writer of a ring (a publisher's RingWriter, or a replica's mirror in the daemon) stores its
commit, fences, then reads the waiting bytes and posts the subscribers asleep on an epoch not
posted yet (spec/ring.md, "Wake-up protocol").  This room only loads a ring's words (the
subscribers own their waiting bytes, the daemon slot_high): it must never store to the ring.
"""

from __future__ import annotations

import os
import secrets

import posix_ipc

from shimmy.errors import LimitExceeded, PermissionDenied
from shimmy.ring.checks import corrupted
from shimmy.ring.layout import I_SLOT_HIGH, OFF_SLOT_HIGH, OFF_WAITING
from shimmy.ring.views import RingView


# The full memory barrier of the wake-up handshake (spec/ring.md, "Wake-up protocol").  Posting a
# process-private semaphore is one LOCK-prefixed read-modify-write in glibc's sem_post, a full
# fence on x86-64, and costs about 25 ns from Python (an uncontended lock acquire+release, the
# other candidate, about 75 ns).  The semaphore is unlinked at once, so it never shows in
# /dev/shm; it only counts up, and is replaced when it reaches SEM_VALUE_MAX (once per 2**31
# fences).  It is created on the first fence, never at import: ``import shimmy`` must work on a
# full or read-only /dev/shm.
def _new_fence_semaphore() -> posix_ipc.Semaphore:
    while True:
        name = f"/shimmy-fence-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            sem = posix_ipc.Semaphore(name, posix_ipc.O_CREX)
        except posix_ipc.ExistentialError:
            continue
        except posix_ipc.PermissionsError as exc:
            raise PermissionDenied(
                f"cannot create the process's fence semaphore {name!r} in /dev/shm: {exc}; "
                f"Shimmy needs a writable /dev/shm (mount it read-write, or give this uid access)"
            ) from None
        except OSError as exc:   # ENOSPC, ENOMEM, EMFILE, ENFILE: a resource ran out
            raise LimitExceeded(
                f"cannot create the process's fence semaphore {name!r} in /dev/shm: "
                f"{os.strerror(exc.errno) if exc.errno else exc} (it needs one small "
                f"semaphore: free space in /dev/shm or raise the open-file limit)"
            ) from None
        except posix_ipc.Error as exc:
            raise LimitExceeded(f"cannot create the process's fence semaphore {name!r} in "
                                f"/dev/shm: {exc}") from None
        sem.unlink()
        return sem


def _install_fence_semaphore() -> None:
    global fence_post
    fence_post = _new_fence_semaphore().release


def _first_fence() -> None:
    """``fence_post`` until the first fence: create the semaphore, then fence with it."""
    _install_fence_semaphore()
    fence_post()


fence_post = _first_fence


def fence_overflowed() -> None:
    _install_fence_semaphore()
    fence_post()


def fence() -> None:
    try:
        fence_post()
    except OSError:   # EOVERFLOW after 2**31 posts: start a fresh counter (and still fence)
        fence_overflowed()



def next_epoch(epoch: int) -> int:
    """The sleep epoch a waiter stores in its waiting byte next (cycles 1..255, never 0)."""
    return epoch % 255 + 1


class Wakeups:
    """Posts the semaphores of a ring's sleeping subscribers, for whichever process writes the
    ring (the publisher's RingWriter, or a replica's MirrorReplica in the daemon).

    A waiting byte holds its sleeper's epoch (1..255, new on every arming), and each epoch is
    posted once: a subscriber that wakes and sleeps again is always seen as new, while one that
    has not run yet is not posted again by every commit (each post to a sleeping futex is a
    syscall).  ``posted_w0`` is the first waiting word as of the last scan; the writer's commit
    path compares the live word with it and calls :meth:`wake` only when they differ (or the
    daemon's wide byte says slots past the first word exist).
    """

    posted_w0: int   # read by _ringcore.c by name (native.check_lookups checks it at import)

    def __init__(self, view: RingView, sem_prefix: str):
        self.v = view
        self._sem_prefix = sem_prefix
        self._posted = bytearray(view.max_subscribers)
        self.posted_w0 = 0
        self._sems: dict[int, posix_ipc.Semaphore] = {}

    def slot_high(self) -> int:
        """The daemon's slot_high word, validated (a garbage value must not index past the
        slot table)."""
        high = self.v.u32[I_SLOT_HIGH]
        if high > self.v.max_subscribers:
            raise corrupted(self.v, f"slot_high {high} exceeds max_subscribers "
                                    f"{self.v.max_subscribers}", OFF_SLOT_HIGH)
        return high

    def wake(self) -> None:
        """Post every subscriber asleep on an epoch not posted yet."""
        high = self.slot_high()
        flags = bytes(self.v.mv[OFF_WAITING:OFF_WAITING + high + 1])  # + the wide byte
        posted = self._posted
        for slot in range(high):
            epoch = flags[slot + (slot >= 7)]
            if epoch and epoch != posted[slot]:
                posted[slot] = epoch
                self.post(slot)
        self.posted_w0 = int.from_bytes(flags[:8].ljust(8, b"\0"), "little")

    def post_all(self) -> None:
        """Post every slot, asleep or not (something every subscriber must re-check changed)."""
        for slot in range(self.slot_high()):
            self.post(slot)

    def post(self, slot: int) -> None:
        sem = self._sems.get(slot)
        if sem is None:
            try:
                sem = posix_ipc.Semaphore(self._sem_prefix + str(slot))
            except posix_ipc.ExistentialError:
                return  # never handed out, or gone with its channel
            self._sems[slot] = sem
        sem.release()

    def close(self) -> None:
        for sem in self._sems.values():
            try:
                sem.close()
            except posix_ipc.Error:
                pass
        self._sems.clear()
