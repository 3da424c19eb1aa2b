"""The RDMA transport (pyverbs): one RC queue pair per mirror, RDMA WRITE into the replica ring.

Shape (docs/rdma.md has the deployment side and the steps in prose):

* The replica registers its ring's shared-memory mapping once per mirror as a memory region
  with remote-write access (the same pages its local subscribers read), plus a small *mailbox*
  region of ``SLOTS`` records, and posts one receive work request per mailbox slot.  It offers
  ``{qpn, psn, gid, ring addr/rkey, mailbox addr/rkey, ...}`` in its ``mirror`` request over the
  authenticated peer link; the source registers its own ring (local access), brings its QP to
  RTS and answers ``{"t": "rdma", "k": "accept"}``; the replica brings its QP to RTS and answers
  ``ready``.  Any failure on the way: TCP, logged and counted (``rdma_fallbacks``).
* Data: each contiguous committed range is one RDMA WRITE from the source ring straight into the
  replica ring at the same offsets (two WRITEs when it wraps), unsignalled; the batch is closed
  by one signalled WRITE_WITH_IMM of a 64-byte record ``COMMIT(tail, last, pad_until)`` into
  mailbox slot ``seq % SLOTS`` (immediate = ``seq``).  Work requests of one batch go in one
  chained ``post_send``.  The replica's CPU sees nothing until the receive completion of that
  record; only then does it commit (store last, tail, fence, wake) via ``MirrorReplica``.
* Small ranges (below ``rdma_small_write_threshold``) take the CPU path: the source copies them
  into its staging slot and one WRITE_WITH_IMM carries record + bytes into the mailbox; the
  replica copies them into the ring (``put_target`` + ``commit``, as over TCP).
* Jumps travel as records too, so every replica-side change arrives in one ordered stream.
* Lossy guard: before a WRITE may land on ring offsets the replica's readers could still be
  reading, the source sends ``GUARD(need, ahead)``; the replica stores a head >= need (up to a
  quarter ring ahead, so this costs one round trip per quarter ring) and acknowledges over the
  link.  No byte is written at or past the acknowledged head + capacity.
* Lossy mode also waits for the completion of the batch's last WRITE before ``put`` returns:
  only then has the adapter read the source bytes, so the mirror's seqlock check after ``put``
  still proves they were intact.  Reliable mode does not wait (the mirror's slot holds them).
* Flow control on the mailbox: the replica reposts a slot's receive only after it has processed
  that record, and records are single packets (slot size <= path MTU), so a source that runs
  ahead gets receiver-not-ready NAKs (retried without limit) instead of overwriting a record;
  every record also carries its sequence number, checked by the replica.
* Errors: a failed completion, a QP that left RTS or a violated record tears the mirror down with
  a log line naming the step and the reason; the replica asks for the mirror again (a new QP, or
  TCP after ``RDMA_RETRIES`` failures) and resumes from its committed tail, so reliable mode loses
  nothing.

The rooms (``from shimmy.daemon.peer import rdma`` and ``rdma.X`` reach what callers use):

* ``device``   -- the port and GID, ``available``, the RLIMIT_MEMLOCK check (sysfs and /proc);
* ``wire``     -- the records, the handshake maps and the pure rules both ends apply;
* ``endpoint`` -- ``Endpoint``: the verbs resources of one end and its queue pair's connection;
* ``writer``   -- ``RdmaTransport``: the source end (WRITEs, records, guard);
* ``receiver`` -- ``RdmaReceiver``: the replica end (mailbox, completion thread).

Which transport each mirror runs over, and the control messages of the handshake, are the peer
module's ``rdma_mirrors``.  pyverbs is imported only inside functions: the package imports (and
its pure helpers run) where pyverbs does not exist.  This file only re-exports; it must never
hold RDMA logic.
"""

from __future__ import annotations

from .device import RdmaSetupError, available, gid_index, memlock_problem, pick_gid, select_port
from .receiver import RdmaReceiver
from .wire import (OFFER_FIELDS, OP_COMMIT, RDMA_RETRIES, REC, REC_AREA, check_fields, choose,
                   guard_request, split_range, uses_cpu_path, wc_error)
from .writer import RdmaTransport

__all__ = [
    "OFFER_FIELDS", "OP_COMMIT", "RDMA_RETRIES", "REC", "REC_AREA", "RdmaReceiver",
    "RdmaSetupError", "RdmaTransport", "available", "check_fields", "choose", "gid_index",
    "guard_request", "memlock_problem", "pick_gid", "select_port", "split_range", "uses_cpu_path",
    "wc_error",
]
