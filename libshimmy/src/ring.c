/* The pub/sub ring: mapping, the publisher (RingWriter), a subscriber's cursor (RingReader,
 * GroupReader) and the wake-ups (Wakeups).  spec/ring.md is the rule book; each
 * function below names the Python twin in shimmy/ring/ whose loads and stores it makes, in
 * the same order, so every crash point of that document holds for it line by line.  Where
 * Python relies on x86-64's store order the order is stated here to the compiler too (the
 * table "The C paths" of spec/ring.md). */
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "internal.h"

#define ROOM_POLL_FAST 50e-6
#define ROOM_POLL_FAST_FOR 0.01
#define DEFAULT_BACKOFF_MAX 0.001

/* ---- mapping ----------------------------------------------------------------------------- */

int seg_corrupted(const shm_seg *seg, uint64_t offset, const char *fmt, ...) {
    char what[600];
    FORMAT_VARGS(what, fmt);
    /* ring.corrupted(): names the channel, what was wrong and the byte offset */
    return shm_fail(SHIMMY_E_RING_CORRUPTED,
                    "%s '%s' is corrupted: %s (segment offset %llu); delete it (shimmy rm) and "
                    "open it again", seg->kind == 's' ? "stream" : "channel", seg->name, what,
                    (unsigned long long)offset);
}

int seg_check(shm_seg *seg, uint8_t *mem, size_t size, char kind) {
    const char *kname = kind == 's' ? "stream" : "ring";
    uint64_t magic = kind == 's' ? 0x4D525453594D4853ULL : RING_MAGIC;
    uint32_t want = kind == 's' ? SHIMMY_STREAM_LAYOUT : SHIMMY_RING_LAYOUT;
    memset(seg, 0, sizeof *seg);
    seg->kind = kind;
    if (size < CONTROL_SIZE || ld_rlx(mem + OFF_MAGIC) != magic)
        return shm_fail(SHIMMY_E_RING_CORRUPTED,
                        "shared-memory segment is not a Shimmy %s (bad magic)", kname);
    uint32_t version;
    memcpy(&version, mem + OFF_VERSION, 4);
    if (version != want)
        return shm_fail(SHIMMY_E_RING_CORRUPTED, "%s layout version %u, this library speaks %u",
                        kname, version, want);
    uint32_t data_offset;
    memcpy(&seg->cap, mem + OFF_CAPACITY, 8);
    memcpy(&data_offset, mem + (kind == 's' ? 24 : OFF_DATA_OFFSET), 4);
    if ((uint64_t)size != (uint64_t)data_offset + seg->cap)
        return shm_fail(SHIMMY_E_RING_CORRUPTED, "%s segment is %zu bytes, header says %llu",
                        kname, size, (unsigned long long)data_offset + seg->cap);
    uint32_t n;
    memcpy(&n, mem + OFF_NAME, 4);
    if (n > 200)
        n = 200;
    memcpy(seg->name, mem + OFF_NAME + 4, n);
    seg->name[n] = 0;
    if (seg->cap < MIN_CAPACITY || seg->cap > MAX_CAPACITY || (seg->cap & (seg->cap - 1)) ||
        data_offset % 4096 || data_offset < CONTROL_SIZE)
        return seg_corrupted(seg, OFF_CAPACITY, "capacity %llu or data offset %u out of range",
                             (unsigned long long)seg->cap, data_offset);
    if (kind == 'r') {
        memcpy(&seg->mode, mem + OFF_MODE, 4);
        memcpy(&seg->max_subs, mem + OFF_MAX_SUBS, 4);
        if (seg->max_subs > MAX_SUBSCRIBERS_LIMIT ||
            (uint64_t)CONTROL_SIZE + (uint64_t)seg->max_subs * SLOT_SIZE > data_offset)
            return seg_corrupted(seg, OFF_MAX_SUBS, "max_subscribers %u does not fit the slot "
                                 "table", seg->max_subs);
    }
    seg->mem = mem;
    seg->size = size;
    seg->data = mem + data_offset;
    seg->mask = seg->cap - 1;
    seg->max_message = seg->cap / 2 - HEADER;
    return 0;
}

/* client.open_shared_memory's error texts: a refusal names the path, its owner and mode. */
static int open_error(const char *path, const char *what, int err) {
    struct stat st;
    if (err == EACCES || err == EPERM) {
        char whose[128] = "it cannot be inspected";
        if (stat(path, &st) == 0)
            snprintf(whose, sizeof whose, "it belongs to uid %u gid %u with mode %04o",
                     st.st_uid, st.st_gid, st.st_mode & 07777);
        return shm_fail(SHIMMY_E_PERMISSION_DENIED,
                        "cannot open %s %s as uid %u: %s; run the application as the owner or "
                        "in the group the daemon shares with (daemon settings channel_group, "
                        "channel_rules, socket_group; docs/security.md)", what, path,
                        (unsigned)geteuid(), whose);
    }
    if (err == ENOSPC || err == ENOMEM || err == EMFILE || err == ENFILE)
        return shm_fail(SHIMMY_E_LIMIT, "cannot open %s: %s", path, strerror(err));
    if (err == ENOENT)
        return shm_fail(SHIMMY_E_CLOSED, "%s %s is gone (deleted by the daemon); open it again",
                        what, path);
    return shm_fail(SHIMMY_E_ERROR, "cannot open %s: %s", path, strerror(err));
}

int seg_map(const char *shm_name, char kind, shm_seg *seg) {
    char path[300];
    snprintf(path, sizeof path, "/dev/shm/%s", shm_name[0] == '/' ? shm_name + 1 : shm_name);
    int fd = shm_open(shm_name, O_RDWR, 0);
    if (fd < 0)
        return open_error(path, "shared memory", errno);
    struct stat st;
    if (fstat(fd, &st) < 0) {
        int e = errno;
        close(fd);
        return open_error(path, "shared memory", e);
    }
    void *mem = mmap(NULL, (size_t)st.st_size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (mem == MAP_FAILED)
        return open_error(path, "shared memory", errno);
    int rc = seg_check(seg, mem, (size_t)st.st_size, kind);
    if (rc < 0)
        munmap(mem, (size_t)st.st_size);
    return rc;
}

void seg_unmap(shm_seg *seg) {
    if (seg->mem != NULL)
        munmap(seg->mem, seg->size);
    seg->mem = seg->data = NULL;
}

/* ---- positions and frames (ring.check_positions, ring.frame_end) ------------------------- */

static int check_positions(shm_seg *s, uint64_t head, uint64_t last, uint64_t tail) {
    if ((head | last | tail) & 15)
        return seg_corrupted(s, OFF_TAIL, "unaligned position (head %llu, last %llu, tail %llu)",
                             (unsigned long long)head, (unsigned long long)last,
                             (unsigned long long)tail);
    if (!(head <= last && last <= tail))
        return seg_corrupted(s, OFF_TAIL, "positions out of order (head %llu, last %llu, tail "
                             "%llu: head <= last <= tail always holds)", (unsigned long long)head,
                             (unsigned long long)last, (unsigned long long)tail);
    return 0;
}

static void read_header(const shm_seg *s, uint64_t p, uint32_t *length, uint32_t *flags,
                        uint64_t *seq) {
    const uint8_t *f = s->data + (p & s->mask);
    memcpy(length, f, 4);
    memcpy(flags, f + 4, 4);
    memcpy(seq, f + 8, 8);
}

/* The end of the frame at p, or < 0 (RingCorrupted) unless it is a well-formed frame or PAD
 * ending at or before limit. */
static int frame_end(shm_seg *s, uint64_t p, uint32_t length, uint32_t flags, uint64_t limit,
                     uint64_t *end) {
    uint64_t at = (uint64_t)(s->data - s->mem) + (p & s->mask);
    if (flags == 0) {
        if (length > s->max_message)
            return seg_corrupted(s, at, "frame length %u exceeds the largest message %llu",
                                 length, (unsigned long long)s->max_message);
        *end = p + frame_size(length);
    } else if (flags == FLAG_PAD && !(length & 15)) {
        *end = p + length + HEADER;
    } else {
        return seg_corrupted(s, at, "bad frame header (length %u, flags %#x)", length, flags);
    }
    if (*end > limit)
        return seg_corrupted(s, at, "frame at position %llu ends at %llu, past %llu",
                             (unsigned long long)p, (unsigned long long)*end,
                             (unsigned long long)limit);
    return 0;
}

/* ring.stream_point(view, oldest=False): the tail and the seq at the tail, exact in every
 * state a live or dead publisher leaves (spec/ring.md, "The seq at the tail"). */
int stream_point_tail(shm_seg *s, uint64_t *position, uint64_t *seq_out) {
    uint8_t *mem = s->mem;
    for (int attempt = 0; attempt < 100000; attempt++) {
        uint64_t tail = ld_acq(mem + OFF_TAIL), last = ld_acq(mem + OFF_LAST);
        uint32_t length, flags;
        uint64_t seq;
        read_header(s, last, &length, &flags, &seq);
        atomic_thread_fence(memory_order_acquire);
        uint64_t head = ld_rlx(mem + OFF_HEAD);
        if (ld_rlx(mem + OFF_TAIL) != tail || ld_rlx(mem + OFF_LAST) != last)
            continue;
        int rc = check_positions(s, head, last, tail);
        if (rc < 0)
            return rc;
        if (tail == 0) {
            *position = *seq_out = 0;
            return 0;
        }
        uint64_t end;
        if (last < tail) {
            rc = frame_end(s, last, length, flags, tail, &end);
            while (rc == 0 && end < tail) {
                read_header(s, end, &length, &flags, &seq);
                rc = frame_end(s, end, length, flags, tail, &end);
            }
            atomic_thread_fence(memory_order_acquire);
            if (ld_rlx(mem + OFF_TAIL) != tail || ld_rlx(mem + OFF_LAST) != last)
                continue;
            if (rc < 0)
                return rc;
            *seq_out = seq + 1;
        } else {
            rc = frame_end(s, last, length, flags, last + s->cap, &end);
            if (rc < 0)
                return rc;
            *seq_out = flags ? seq + 1 : seq;
        }
        *position = tail;
        return 0;
    }
    return shm_fail(SHIMMY_E_RING_CORRUPTED, "channel '%s': the publisher moved on 100000 times "
                    "while its tail was being read", s->name);
}

int stream_point_oldest(shm_seg *s, uint64_t *position, uint64_t *seq_out) {
    uint64_t at_tail;
    for (int attempt = 0; attempt < 100000; attempt++) {
        int rc = stream_point_tail(s, position, &at_tail);
        if (rc < 0)
            return rc;
        uint64_t tail = *position, p = ld_acq(s->mem + OFF_HEAD);
        int again = 0;
        while (p < tail) {
            uint32_t length, flags;
            uint64_t seq, end;
            read_header(s, p, &length, &flags, &seq);
            atomic_thread_fence(memory_order_acquire);
            if (ld_rlx(s->mem + OFF_HEAD) > p) {   /* overwritten under us: start again */
                again = 1;
                break;
            }
            if ((rc = frame_end(s, p, length, flags, tail, &end)) < 0)
                return rc;
            if (!flags) {
                *position = p;
                *seq_out = seq;
                return 0;
            }
            p = end;
        }
        if (!again) {
            *seq_out = at_tail;
            return 0;
        }
    }
    return shm_fail(SHIMMY_E_RING_CORRUPTED, "channel '%s': the publisher moved on 100000 times "
                    "while its head was being read", s->name);
}

/* ---- wake-ups (ring.Wakeups) ------------------------------------------------------------- */

int wakeups_init(wakeups *w, shm_seg *seg, const char *sem_prefix) {
    memset(w, 0, sizeof *w);
    w->seg = seg;
    snprintf(w->prefix, sizeof w->prefix, "%s", sem_prefix);
    size_t n = seg->max_subs ? seg->max_subs : 1;
    w->posted = calloc(n, 1);
    w->sems = calloc(n, sizeof *w->sems);
    if (w->posted == NULL || w->sems == NULL) {
        wakeups_close(w);
        return shm_fail(SHIMMY_E_LIMIT, "out of memory for %zu wake-up slots", n);
    }
    return 0;
}

void wakeups_close(wakeups *w) {
    if (w->sems != NULL && w->seg != NULL)
        for (uint32_t i = 0; i < w->seg->max_subs; i++)
            if (w->sems[i] != NULL)
                sem_close(w->sems[i]);
    free(w->sems);
    free(w->posted);
    w->sems = NULL;
    w->posted = NULL;
}

static void wakeups_post(wakeups *w, uint32_t slot) {
    if (w->sems[slot] == NULL) {
        char name[300];
        snprintf(name, sizeof name, "%s%u", w->prefix, slot);
        sem_t *sem = sem_open(name, 0);
        if (sem == SEM_FAILED)
            return;   /* never handed out, or gone with its channel */
        w->sems[slot] = sem;
    }
    sem_post(w->sems[slot]);
}

static int slot_high(shm_seg *s, uint32_t *high) {
    *high = ld32_rlx(s->mem + OFF_SLOT_HIGH);
    if (*high > s->max_subs)
        return seg_corrupted(s, OFF_SLOT_HIGH, "slot_high %u exceeds max_subscribers %u", *high,
                             s->max_subs);
    return 0;
}

/* Wakeups.wake: post every subscriber asleep on an epoch not posted yet. */
int wakeups_wake(wakeups *w) {
    uint32_t high;
    int rc = slot_high(w->seg, &high);
    if (rc < 0)
        return rc;
    const uint8_t *flags = w->seg->mem + OFF_WAITING;
    for (uint32_t slot = 0; slot < high; slot++) {
        uint8_t epoch = atomic_load_explicit((_Atomic uint8_t *)(uintptr_t)(flags + slot + (slot >= 7)),
                                             memory_order_relaxed);
        if (epoch && epoch != w->posted[slot]) {
            w->posted[slot] = epoch;
            wakeups_post(w, slot);
        }
    }
    uint8_t first[8] = {0};
    memcpy(first, flags, high + 1 < 8 ? high + 1 : 8);
    memcpy(&w->posted_w0, first, 8);
    return 0;
}

/* After every commit: FENCE (the Dekker pair with the subscriber's sleep), then load the first
 * waiting word; scan only when it differs from the one scanned last (RingWriter._commit). */
static inline int after_commit(ring_writer *w) {
    atomic_thread_fence(memory_order_seq_cst);   /* SYNC POINT (wake-up fence) */
    uint64_t waiting = ld_rlx(w->seg->mem + OFF_WAITING);
    if (waiting && (waiting != w->wk->posted_w0 || waiting >= WIDE_BIT))
        return wakeups_wake(w->wk);
    return 0;
}

/* ---- the publisher (ring.RingWriter) ----------------------------------------------------- */

static int closed_error(ring_writer *w) {
    return shm_retired(w->seg->name);
}

/* RingWriter._resume: take over from whatever state the previous holder left. */
int writer_init(ring_writer *w, shm_seg *seg, wakeups *wk, const char *room) {
    memset(w, 0, sizeof *w);
    w->seg = seg;
    w->wk = wk;
    w->backoff_max = DEFAULT_BACKOFF_MAX;
    w->loan_n = UINT64_MAX;
    snprintf(w->room_name, sizeof w->room_name, "%s", room != NULL ? room : "");
    uint8_t *mem = seg->mem;
    /* A predecessor that died waiting for room left room_wait set; the word is ours now. */
    st_rlx(mem + OFF_ROOM_WAIT, 0);
    uint64_t tail = ld_acq(mem + OFF_TAIL), head = ld_acq(mem + OFF_HEAD),
             last = ld_acq(mem + OFF_LAST);
    int rc = check_positions(seg, head, last, tail);
    if (rc < 0)
        return rc;
    if (last == tail && tail) {
        /* The previous holder died between its two commit stores: roll the commit forward. */
        uint32_t length, flags;
        uint64_t seq, end;
        read_header(seg, tail, &length, &flags, &seq);
        rc = frame_end(seg, tail, length, flags, head + seg->cap, &end);
        if (rc < 0)
            return rc;
        st_rel(mem + OFF_TAIL, end);   /* SYNC POINT (commit), as in publish */
        tail = end;
    }
    w->tail = tail;
    w->head = head;
    uint64_t pos;
    rc = stream_point_tail(seg, &pos, &w->seq);
    if (rc < 0)
        return rc;
    w->limit = head + seg->cap;
    return 0;
}

/* RingWriter.min_position: the slowest ACTIVE subscriber's position, or the tail. */
static int min_position(ring_writer *w, uint64_t *out) {
    shm_seg *s = w->seg;
    uint32_t high;
    int rc = slot_high(s, &high);
    if (rc < 0)
        return rc;
    uint64_t low = w->tail;
    for (uint32_t slot = 0; slot < high; slot++) {
        uint8_t *line = s->mem + CONTROL_SIZE + (uint64_t)slot * SLOT_SIZE;
        if (ld32_rlx(line + 8) != SLOT_ACTIVE)
            continue;
        uint64_t p = ld_acq(line);
        if (p < low)
            low = p;
        else if (p > w->tail)
            return seg_corrupted(s, CONTROL_SIZE + (uint64_t)slot * SLOT_SIZE,
                                 "subscriber slot %u position %llu is past the tail %llu", slot,
                                 (unsigned long long)p, (unsigned long long)w->tail);
    }
    *out = low;
    return 0;
}

static void sleep_s(double s) {
    struct timespec ts = {(time_t)s, (long)((s - (double)(time_t)s) * 1e9)};
    nanosleep(&ts, NULL);
}

void writer_close(ring_writer *w) {
    if (w->room != NULL)
        sem_close(w->room);
    w->room = NULL;
}

static int no_room(ring_writer *w, uint64_t end, double timeout) {
    return shm_fail(SHIMMY_E_BACKPRESSURE_TIMEOUT, "channel '%s': no room for %llu bytes after "
                    "waiting %g s for the slowest subscriber (publish_timeout)", w->seg->name,
                    (unsigned long long)(end - w->tail), timeout);
}

/* RingWriter._room_look, one look of the room wait: 0 a frame ending at `end` fits above the
 * slowest position (in *floor), 1 not yet, < 0 an error (the ring was retired, or a slot lies). */
static int room_look(ring_writer *w, uint64_t end, uint64_t *floor) {
    int rc = min_position(w, floor);
    if (rc < 0)
        return rc;
    if (end - *floor <= w->seg->cap)
        return 0;
    if (ld_rlx(w->seg->mem + OFF_RETIRED))
        return closed_error(w);
    return 1;
}

/* RingWriter._poll_for_space: wait_for_space without a room semaphore. */
static int poll_for_space(ring_writer *w, uint64_t end, double timeout, uint64_t *floor) {
    double now = mono_now();
    double deadline = timeout < 0 ? -1 : now + timeout;
    double fast_until = now + ROOM_POLL_FAST_FOR;
    double delay = 20e-6;
    for (;;) {
        int rc = room_look(w, end, floor);
        if (rc <= 0)
            return rc;
        now = mono_now();
        if (deadline >= 0 && now >= deadline)
            return no_room(w, end, timeout);
        double d = delay;
        if (deadline >= 0 && d > deadline - now)
            d = deadline - now > 0 ? deadline - now : 0;
        sleep_s(d);
        delay *= 2;
        double cap = now < fast_until ? ROOM_POLL_FAST : w->backoff_max;
        if (delay > cap)
            delay = cap;
    }
}

/* The room wait's loop (RingWriter._wait_for_space): room_wait is set; fence, re-check, sleep
 * on the room semaphore for at most backoff_max. */
static int sleep_for_space(ring_writer *w, uint64_t end, double timeout, uint64_t *floor) {
    double deadline = timeout < 0 ? -1 : mono_now() + timeout;
    for (;;) {
        atomic_thread_fence(memory_order_seq_cst);   /* SYNC POINT (room wait, publisher side) */
        int rc = room_look(w, end, floor);
        if (rc <= 0)
            return rc;
        double wait = w->backoff_max;
        if (deadline >= 0) {
            double left = deadline - mono_now();
            if (left <= 0)
                return no_room(w, end, timeout);
            if (wait > left)
                wait = left;
        }
        struct timespec at;
        clock_gettime(CLOCK_MONOTONIC, &at);
        long ns = at.tv_nsec + (long)(wait * 1e9);
        at.tv_sec += ns / 1000000000L;
        at.tv_nsec = ns % 1000000000L;
        sem_clockwait(w->room, CLOCK_MONOTONIC, &at);   /* a post, the bound or EINTR: re-check */
    }
}

/* RingWriter._wait_for_space: reliable, wait (bounded) until the slowest subscriber made room.
 * Sleeps on the ring's room semaphore, which consumers post when their position reaches the
 * one stored in room_wait (spec/ring.md, "Waiting for room"); polls without one. */
static int wait_for_space(ring_writer *w, uint64_t end, double timeout, uint64_t *floor) {
    uint8_t *mem = w->seg->mem;
    st_rlx(mem + OFF_WAITS, ld_rlx(mem + OFF_WAITS) + 1);   /* slow path only; our own word */
    if (w->room == NULL && w->room_name[0]) {
        sem_t *sem = sem_open(w->room_name, 0);
        if (sem == SEM_FAILED)
            w->room_name[0] = 0;   /* none to open: poll from now on */
        else
            w->room = sem;
    }
    if (w->room == NULL)
        return poll_for_space(w, end, timeout, floor);
    /* SYNC POINT (room wait, publisher side): store room_wait, fence (in the loop), re-check */
    st_rlx(mem + OFF_ROOM_WAIT, end - w->seg->cap);
    int rc = sleep_for_space(w, end, timeout, floor);
    st_rlx(mem + OFF_ROOM_WAIT, 0);
    return rc;
}

/* RingWriter._make_room: move head so that a frame ending at `end` overwrites nothing still
 * needed; head is stored before any byte of the frames it passes is overwritten. */
static int make_room(ring_writer *w, uint64_t end, double timeout) {
    shm_seg *s = w->seg;
    uint64_t cap = s->cap, floor;
    if (ld_rlx(s->mem + OFF_RETIRED))
        return closed_error(w);
    if (s->mode == MODE_RELIABLE) {
        int rc = min_position(w, &floor);
        if (rc < 0)
            return rc;
        if (end - floor > cap && (rc = wait_for_space(w, end, timeout, &floor)) < 0)
            return rc;
    } else {
        floor = end;
    }
    uint64_t last = ld_rlx(s->mem + OFF_LAST);   /* our own word */
    uint64_t target = end - cap + (cap >> 4);
    if (floor < target)
        target = floor;
    if (last < target)
        target = last;
    uint64_t must = end - cap, head = w->head;
    while (head < must || head < target) {
        uint32_t length, flags;
        uint64_t seq, next;
        read_header(s, head, &length, &flags, &seq);
        next = head + ((length + HEADER + 15) & ~(uint64_t)15);   /* a PAD's length is aligned */
        if (flags > FLAG_PAD || length > s->max_message || next > last) {
            int rc = frame_end(s, head, length, flags, last, &next);
            if (rc < 0)
                return rc;
        }
        if (head >= must && next > target)
            break;
        head = next;
    }
    w->head = head;
    /* SYNC POINT (overwrite guard): head is stored before any byte of the frames it passes is
     * overwritten.  The release fence after the store orders it before every later store
     * (x86-64: plain program order; AArch64: a dmb ishst). */
    st_rlx(s->mem + OFF_HEAD, head);
    atomic_thread_fence(memory_order_release);
    w->limit = head + cap;
    return 0;
}

static int too_large(ring_writer *w, uint64_t n) {
    return shm_fail(SHIMMY_E_MESSAGE_TOO_LARGE, "message of %llu bytes exceeds the largest "
                    "message %llu bytes of channel '%s' (capacity %llu bytes: largest = "
                    "capacity/2 - %d)", (unsigned long long)n,
                    (unsigned long long)w->seg->max_message, w->seg->name,
                    (unsigned long long)w->seg->cap, HEADER);
}

/* RingWriter._reserve: room for an n-byte frame at the tail (the PAD at the wrap point is
 * committed alone); returns its ring offset via *off. */
static int reserve(ring_writer *w, uint64_t n, double timeout, uint64_t *off_out) {
    shm_seg *s = w->seg;
    if (n > s->max_message)
        return too_large(w, n);
    uint64_t size = frame_size(n), tail = w->tail, off = tail & s->mask, room = s->cap - off;
    int rc;
    if (size > room) {
        if (tail + room > w->limit && (rc = make_room(w, tail + room, timeout)) < 0)
            return rc;
        /* the PAD carries the seq of the message before it */
        uint8_t *f = s->data + off;
        uint32_t hdr[2] = {(uint32_t)(room - HEADER), FLAG_PAD};
        uint64_t pseq = w->seq - 1;
        memcpy(f, hdr, 8);
        memcpy(f + 8, &pseq, 8);
        st_rel(s->mem + OFF_LAST, tail);   /* SYNC POINT (complete frame) */
        w->tail = tail = tail + room;
        st_rel(s->mem + OFF_TAIL, tail);   /* SYNC POINT (commit of the PAD alone) */
        off = 0;
    }
    if (tail + size > w->limit && (rc = make_room(w, tail + size, timeout)) < 0)
        return rc;
    *off_out = off;
    return 0;
}

/* The frame's ring offset for an n-byte message at the tail: the fast path when it fits before
 * the wrap point and the limit, else reserve(). */
static inline int frame_at(ring_writer *w, uint64_t n, double timeout, uint64_t *off) {
    shm_seg *s = w->seg;
    if (ld_rlx(s->mem + OFF_RETIRED))   /* deleted, or its daemon restarted */
        return closed_error(w);
    uint64_t tail = w->tail;
    *off = tail & s->mask;
    if (*off + frame_size(n) > s->cap || tail + frame_size(n) > w->limit || n > s->max_message)
        return reserve(w, n, timeout, off);
    return 0;
}

static inline void write_header(shm_seg *s, uint64_t off, uint64_t n, uint64_t seq) {
    uint8_t *f = s->data + off;
    uint32_t hdr[2] = {(uint32_t)n, 0};
    memcpy(f, hdr, 8);
    memcpy(f + 8, &seq, 8);
}

/* RingWriter._publish_py / _ringcore.c writer_publish. */
int writer_publish(ring_writer *w, const void *data, uint64_t n, double timeout, uint64_t *seq) {
    uint64_t off;
    int rc = frame_at(w, n, timeout, &off);
    if (rc < 0)
        return rc;
    shm_seg *s = w->seg;
    write_header(s, off, n, w->seq);
    if (n)
        memcpy(s->data + off + HEADER, data, n);
    uint64_t tail = w->tail, end = tail + frame_size(n);
    st_rel(s->mem + OFF_LAST, tail);   /* SYNC POINT (complete frame): after every byte */
    w->tail = end;
    if (seq != NULL)
        *seq = w->seq;
    w->seq++;
    st_rel(s->mem + OFF_TAIL, end);    /* SYNC POINT (commit) */
    return after_commit(w);
}

/* RingWriter._commit_batch: last = old tail, tail = end, last = the final frame. */
static int commit_batch(ring_writer *w, uint64_t last, uint64_t end, uint64_t seq) {
    uint8_t *mem = w->seg->mem;
    uint64_t first = w->tail;
    st_rel(mem + OFF_LAST, first);     /* SYNC POINT (complete frame) */
    st_rel(mem + OFF_TAIL, end);       /* SYNC POINT (commit) */
    if (last != first)
        st_rel(mem + OFF_LAST, last);  /* the final frame (<= tail now) */
    w->tail = end;
    w->seq = seq;
    return after_commit(w);
}

static int batch_error(int rc, size_t index, size_t *published) {
    char text[1024];
    snprintf(text, sizeof text, "%s", shimmy_errmsg());
    if (published != NULL)
        *published = index;
    return shm_fail(-rc, "message %zu of the batch (the %zu before it were published): %s",
                    index, index, text);
}

/* RingWriter._publish_many_py / writer_publish_many in _ringcore.c. */
int64_t writer_publish_many(ring_writer *w, const struct iovec *msgs, size_t count,
                            double timeout, size_t *published) {
    shm_seg *s = w->seg;
    if (ld_rlx(s->mem + OFF_RETIRED))
        return batch_error(closed_error(w), 0, published);
    uint64_t tail = w->tail, seq = w->seq, limit = w->limit, last = 0;
    int pending = 0;
    for (size_t i = 0; i < count; i++) {
        uint64_t n = msgs[i].iov_len, size = frame_size(n), off = tail & s->mask;
        if (off + size > s->cap || tail + size > limit || n > s->max_message) {
            /* slow path: commit what is written, then reserve like publish */
            int rc;
            if (pending) {
                if ((rc = commit_batch(w, last, tail, seq)) < 0)
                    return batch_error(rc, i, published);
                pending = 0;
            }
            if ((rc = reserve(w, n, timeout, &off)) < 0)
                return batch_error(rc, i, published);
            tail = w->tail;
            limit = w->limit;
        }
        write_header(s, off, n, seq);
        if (n)
            memcpy(s->data + off + HEADER, msgs[i].iov_base, n);
        last = tail;
        pending = 1;
        tail += size;
        seq++;
    }
    if (pending) {
        int rc = commit_batch(w, last, tail, seq);
        if (rc < 0)
            return batch_error(rc, count, published);
    }
    if (published != NULL)
        *published = count;
    return (int64_t)count;
}

/* RingWriter._claim_py: room and header for an n-byte frame; nothing visible until commit. */
int writer_claim(ring_writer *w, uint64_t n, double timeout, void **buf) {
    uint64_t off;
    int rc = frame_at(w, n, timeout, &off);
    if (rc < 0)
        return rc;
    write_header(w->seg, off, n, w->seq);
    *buf = w->seg->data + off + HEADER;
    w->loan_n = n;
    return 0;
}

/* RingWriter._commit_claim_py (steps 3-5 of the commit protocol). */
uint64_t writer_commit_claim(ring_writer *w, uint64_t n) {
    uint8_t *mem = w->seg->mem;
    uint64_t tail = w->tail, seq = w->seq;
    st_rel(mem + OFF_LAST, tail);           /* SYNC POINT (complete frame) */
    w->tail = tail + frame_size(n);
    w->seq = seq + 1;
    st_rel(mem + OFF_TAIL, w->tail);        /* SYNC POINT (commit) */
    w->loan_n = UINT64_MAX;
    after_commit(w);   /* a corrupt slot_high only skips the wake-ups; sleepers re-check */
    return seq;
}

/* ---- a subscriber's cursor (ring.RingReader, ring.GroupReader) --------------------------- */

void reader_init(ring_reader *r, shm_seg *seg, uint32_t slot, uint64_t position, uint64_t seq,
                 const char *room) {
    memset(r, 0, sizeof *r);
    r->seg = seg;
    r->pos_off = CONTROL_SIZE + (uint64_t)slot * SLOT_SIZE;
    r->position = r->tail = position;
    r->expect = seq;
    snprintf(r->room_name, sizeof r->room_name, "%s", room != NULL ? room : "");
}

void reader_close(ring_reader *r) {
    if (r->room != NULL)
        sem_close(r->room);
    r->room = NULL;
}

static void room_post(ring_reader *r, uint64_t need) {
    r->room_posted = need;
    if (r->room == NULL) {
        if (!r->room_name[0])
            return;
        sem_t *sem = sem_open(r->room_name, 0);
        if (sem == SEM_FAILED) {
            r->room_name[0] = 0;   /* gone with its channel: the publisher's bound covers it */
            return;
        }
        r->room = sem;
    }
    sem_post(r->room);   /* EOVERFLOW at SEM_VALUE_MAX: the publisher has posts enough */
}

/* After every store of this subscriber's position ``pos`` (RingReader._room_reached): post the
 * room semaphore once per room_wait value at most ``pos``.  No fence (spec/ring.md, "Waiting
 * for room", argues what a post missed this way costs). */
static inline void room_reached(ring_reader *r, uint64_t pos) {
    uint64_t need = ld_rlx(r->seg->mem + OFF_ROOM_WAIT);   /* SYNC POINT (room wait) */
    if (__builtin_expect(need != 0, 0) && need <= pos && need != r->room_posted)
        room_post(r, need);
}

void reader_release_to(ring_reader *r, uint64_t pos) {
    st_rel(r->seg->mem + r->pos_off, pos);   /* SYNC POINT (consumption) */
    room_reached(r, pos);
}

int reader_has_data(const ring_reader *r) { return ld_rlx(r->seg->mem + OFF_TAIL) != r->position; }

int reader_head_at_most(const ring_reader *r, uint64_t pos) {
    atomic_thread_fence(memory_order_acquire);   /* the bytes read stay before this load */
    return ld_rlx(r->seg->mem + OFF_HEAD) <= pos;
}

static int bad_frame(ring_reader *r, uint64_t p, uint32_t length, uint32_t flags) {
    uint64_t end;
    int rc = frame_end(r->seg, p, length, flags, r->tail, &end);
    if (rc < 0)
        return rc;
    return seg_corrupted(r->seg, (uint64_t)(r->seg->data - r->seg->mem) + (p & r->seg->mask),
                         "frame at position %llu (length %u, flags %#x) is not a valid frame",
                         (unsigned long long)p, length, flags);
}

static int pad_end(ring_reader *r, uint64_t p, uint32_t length, uint32_t flags, uint64_t *end) {
    if (flags != FLAG_PAD || (length & 15) || p + length + HEADER > r->tail)
        return bad_frame(r, p, length, flags);
    *end = p + length + HEADER;
    return 0;
}

static int count_lost(ring_reader *r, uint64_t p, uint64_t seq, uint64_t lost) {
    if (lost > MAX_SEQ_GAP)   /* negative too: u64 wraps it above the gap */
        return seg_corrupted(r->seg, (uint64_t)(r->seg->data - r->seg->mem) + (p & r->seg->mask),
                             "frame at position %llu has seq %llu, expected %llu or a later one "
                             "within %llu", (unsigned long long)p, (unsigned long long)seq,
                             (unsigned long long)r->expect, (unsigned long long)MAX_SEQ_GAP);
    r->lost_total += lost;
    st_rlx(r->seg->mem + r->pos_off + SLOT_OFF_LOST, r->lost_total);   /* metrics copy */
    return 0;
}

/* RingReader._resync: lapped, jump to the oldest intact frame. */
static int resync(ring_reader *r, uint64_t head) {
    if ((head & 15) || head > ld_acq(r->seg->mem + OFF_TAIL))
        return seg_corrupted(r->seg, OFF_HEAD, "head %llu is unaligned or past the tail",
                             (unsigned long long)head);
    r->position = head;
    if (r->tail < head)
        r->tail = head;
    return 0;
}

/* At the cached tail: 1 more committed (tail reloaded), 0 nothing (or, for a group member,
 * its batch is done or the epoch moved), < 0 a tail that breaks the invariants. */
static inline int reload(ring_reader *r, uint64_t p) {
    if (r->group != NULL) {   /* GroupReader: checks once per batch */
        if (r->turn) {
            r->turn = 0;
            return 0;
        }
        if (ld32_rlx(r->group) != r->group_epoch)
            return 0;
    }
    uint64_t t = ld_acq(r->seg->mem + OFF_TAIL);   /* SYNC POINT (acquire): pairs with commit */
    if (t == p)
        return 0;
    if (t < p || (t & 15))
        return seg_corrupted(r->seg, OFF_TAIL, "tail %llu is behind this subscriber's position "
                             "%llu or unaligned", (unsigned long long)t, (unsigned long long)p);
    r->tail = t;
    r->turn = r->merged;
    return 1;
}

/* The next message frame at r->position, for both take paths: waits for nothing (reload at the
 * cached tail), jumps to the head when lapped, steps over PADs (storing the consumption position
 * past one too when release_pads: a dead group publisher's ring may end at a PAD committed
 * alone).  1: a message frame at *at whose header was intact when read and whose end is within
 * the tail (r->position not moved past it yet); 0 nothing; < 0 a ring that breaks the rules.
 * Forced inline: it is each take's per-message path, as it was when written out in both. */
static inline __attribute__((always_inline)) int
next_frame(ring_reader *r, int release_pads, uint64_t *at, uint32_t *len, uint64_t *seq_out) {
    shm_seg *s = r->seg;
    for (;;) {
        uint64_t p = r->position;
        if (p == r->tail) {
            int more = reload(r, p);
            if (more <= 0)
                return more;
        }
        uint32_t length, flags;
        uint64_t seq;
        read_header(s, p, &length, &flags, &seq);
        /* SYNC POINT (validate header): head after the header; head <= p: it was intact */
        atomic_thread_fence(memory_order_acquire);
        uint64_t head = ld_rlx(s->mem + OFF_HEAD);
        int rc;
        if (head > p) {
            if ((rc = resync(r, head)) < 0)
                return rc;
            continue;
        }
        if (flags) {
            uint64_t end = 0;
            if ((rc = pad_end(r, p, length, flags, &end)) < 0)
                return rc;
            r->position = end;
            if (release_pads) {
                st_rel(s->mem + r->pos_off, end);
                room_reached(r, end);
            }
            continue;
        }
        if (length > s->max_message || p + frame_size(length) > r->tail)
            return bad_frame(r, p, length, flags);
        *at = p;
        *len = length;
        *seq_out = seq;
        return 1;
    }
}

/* RingReader._take_py (zero copy): release the frame handed out last, then the next frame. */
int reader_take(ring_reader *r, const uint8_t **payload, uint64_t *len, uint64_t *seq_out,
                uint64_t *lost_out, uint64_t *at) {
    shm_seg *s = r->seg;
    st_rel(s->mem + r->pos_off, r->position);   /* SYNC POINT (consumption): handed out last */
    room_reached(r, r->position);
    uint64_t p = 0, seq = 0;   /* set when next_frame returns 1 (the compiler cannot tell) */
    uint32_t length = 0;
    int rc = next_frame(r, 0, &p, &length, &seq);
    if (rc <= 0)
        return rc;
    r->position = p + frame_size(length);
    uint64_t lost = seq - r->expect;
    if (lost && (rc = count_lost(r, p, seq, lost)) < 0)
        return rc;
    r->expect = seq + 1;
    *payload = s->data + (p & s->mask) + HEADER;
    *len = length;
    *seq_out = seq;
    *lost_out = lost;
    *at = p;
    return 1;
}

/* RingReader._take_bytes_py (release = 1) and one step of _take_many_bytes_py (release = 0:
 * the caller stores the position once after the batch). */
int reader_take_copy(ring_reader *r, uint8_t *buf, uint64_t cap, uint64_t *len, uint64_t *seq_out,
                     int release) {
    shm_seg *s = r->seg;
    for (;;) {
        uint64_t p = 0, seq = 0;   /* as in reader_take */
        uint32_t length = 0;
        int rc = next_frame(r, release, &p, &length, &seq);
        if (rc <= 0)
            return rc;
        if (length > cap)
            return shm_fail(SHIMMY_E_INVALID_ARGUMENT, "message of %u bytes on '%s' does not fit "
                            "the buffer of %llu bytes (the channel's largest message is %llu)",
                            length, s->name, (unsigned long long)cap,
                            (unsigned long long)s->max_message);
        memcpy(buf, s->data + (p & s->mask) + HEADER, length);
        uint64_t end = p + frame_size(length);
        r->position = end;
        /* SYNC POINT (validate payload): head after the copy */
        atomic_thread_fence(memory_order_acquire);
        if (ld_rlx(s->mem + OFF_HEAD) > p)
            continue;   /* overwritten while copied: counted as lost by the next message */
        if (release) {
            st_rel(s->mem + r->pos_off, end);   /* SYNC POINT (consumption) */
            room_reached(r, end);
        }
        uint64_t lost = seq - r->expect;
        if (lost && (rc = count_lost(r, p, seq, lost)) < 0)
            return rc;
        r->expect = seq + 1;
        *len = length;
        *seq_out = seq;
        return 1;
    }
}
