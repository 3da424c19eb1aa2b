/* Streams (sdk/stream.py over shimmy/stream_ring.py; layout and rules in spec/stream.md): one
 * writer and one reader of an SPSC byte ring.  The writer alone stores tail, eof and w_waiting,
 * the reader head, r_closed and r_waiting; each commit is one release store after the bytes,
 * and each wake-up is the Dekker pair "store my word, FENCE, load the other's waiting word". */
#include <errno.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>

#include "internal.h"

#define S_TAIL 320
#define S_EOF 328
#define S_W_WAITING 336
#define S_HEAD 384
#define S_R_CLOSED 392
#define S_R_WAITING 400
#define S_W_BROKEN 448
#define S_R_BROKEN 456
#define S_W_PID 464
#define S_R_PID 468
#define S_MAX_SLEEP 0.25
#define S_SPIN 50e-6

struct shimmy_stream {
    shimmy_client *c;
    char name[256];
    enum shimmy_role role;
    int64_t serial;
    shm_seg seg;
    sem_t *sem_r, *sem_w;   /* the reader sleeps on sem_r, the writer on sem_w */
    uint64_t tail, head;    /* cached */
    uint64_t epoch, posted; /* my last sleep epoch; the peer's epoch posted last */
    uint64_t piece;         /* commit at least every quarter ring */
};

static uint64_t word(shimmy_stream *s, uint64_t off) { return ld_acq(s->seg.mem + off); }

static unsigned peer_pid(shimmy_stream *s, int writer) {
    return ld32_rlx(s->seg.mem + (writer ? S_W_PID : S_R_PID));
}

static int check_span(shimmy_stream *s, uint64_t head, uint64_t tail) {
    if (tail < head || tail - head > s->seg.cap)
        return seg_corrupted(&s->seg, S_TAIL, "head %llu and tail %llu are not within "
                             "0..capacity %llu of each other", (unsigned long long)head,
                             (unsigned long long)tail, (unsigned long long)s->seg.cap);
    return 0;
}

/* The other end's pid for an error text, or "none yet" before one attached. */
static void peer_pid_text(shimmy_stream *s, int writer, char out[16]) {
    unsigned pid = peer_pid(s, writer);
    if (pid)
        snprintf(out, 16, "%u", pid);
    else
        snprintf(out, 16, "none yet");
}

static sem_t *open_sem(const char *name, int *rc) {
    sem_t *sem = sem_open(name, 0);
    if (sem == SEM_FAILED) {
        *rc = shm_fail(errno == EACCES ? SHIMMY_E_PERMISSION_DENIED : SHIMMY_E_ERROR,
                       "cannot open semaphore /dev/shm/sem.%s: %s", name + 1, strerror(errno));
        return NULL;
    }
    return sem;
}

static void tell_daemon_closed(shimmy_stream *s) {
    ctl_reply r;
    if (!client_closed(s->c) &&
        ctl_request(s->c, "stream_close", &r, "s:name", s->name, "s:role",
                    s->role == SHIMMY_WRITER ? "writer" : "reader", "i:serial", s->serial,
                    NULL) == 0)
        reply_free(&r);
}

shimmy_stream *stream_attach(const shm_seg *seg, enum shimmy_role role, int *rc) {
    shimmy_stream *s = calloc(1, sizeof *s);
    if (s == NULL) {
        *rc = shm_fail(SHIMMY_E_LIMIT, "out of memory");
        return NULL;
    }
    s->role = role;
    s->seg = *seg;
    snprintf(s->name, sizeof s->name, "%s", seg->name);
    s->tail = word(s, S_TAIL);
    s->head = word(s, S_HEAD);
    if ((*rc = check_span(s, s->head, s->tail)) < 0) {
        free(s);
        return NULL;
    }
    s->piece = s->seg.cap / 4 > 4096 ? s->seg.cap / 4 : 4096;
    return s;
}

void stream_detach(shimmy_stream *s) { free(s); }

void stream_finish(shimmy_stream *s) {
    /* writer: eof after the final tail; reader: r_closed.  Both then wake the peer. */
    st_rel(s->seg.mem + (s->role == SHIMMY_WRITER ? S_EOF : S_R_CLOSED), 1);
    full_fence();
    sem_t *peer = s->role == SHIMMY_WRITER ? s->sem_r : s->sem_w;
    if (peer != NULL)
        sem_post(peer);
}

int shimmy_stream_open(shimmy_client *client, const char *name, enum shimmy_role role,
                       uint64_t capacity, shimmy_stream **out) {
    *out = NULL;
    int rc = validate_name(name);
    if (rc < 0)
        return rc;
    if (role != SHIMMY_WRITER && role != SHIMMY_READER)
        return shm_fail(SHIMMY_E_INVALID_ARGUMENT, "role must be 'writer' or 'reader'");
    ctl_reply r;
    rc = ctl_request(client, "stream_open", &r, "s:name", name, "s:role",
                     role == SHIMMY_WRITER ? "writer" : "reader", "o:capacity",
                     (int64_t)capacity, NULL);
    if (rc < 0)
        return rc;
    shimmy_stream *s = calloc(1, sizeof *s);
    if (s == NULL) {
        reply_free(&r);
        return shm_fail(SHIMMY_E_LIMIT, "out of memory");
    }
    s->c = client;
    s->role = role;
    snprintf(s->name, sizeof s->name, "%s", name);
    char shm[256], semr[256], semw[256];
    if ((rc = mp_int(r.map, "serial", &s->serial)) < 0 ||
        (rc = mp_str(r.map, "shm", shm, sizeof shm)) < 0 ||
        (rc = mp_str(r.map, "sem_reader", semr, sizeof semr)) < 0 ||
        (rc = mp_str(r.map, "sem_writer", semw, sizeof semw)) < 0) {
        reply_free(&r);
        free(s);
        return rc;
    }
    reply_free(&r);
    if ((rc = seg_map(shm, 's', &s->seg)) < 0)
        goto fail;
    if ((s->sem_r = open_sem(semr, &rc)) == NULL || (s->sem_w = open_sem(semw, &rc)) == NULL)
        goto fail;
    s->tail = word(s, S_TAIL);
    s->head = word(s, S_HEAD);
    if ((rc = check_span(s, s->head, s->tail)) < 0)
        goto fail;
    s->piece = s->seg.cap / 4 > 4096 ? s->seg.cap / 4 : 4096;
    *out = s;
    return 0;
fail:
    tell_daemon_closed(s);
    if (s->sem_r)
        sem_close(s->sem_r);
    if (s->sem_w)
        sem_close(s->sem_w);
    seg_unmap(&s->seg);
    free(s);
    return rc;
}

/* _End._post_peer_if_waiting: the caller just stored its commit word. */
static void post_peer_if_waiting(shimmy_stream *s, uint64_t peer_waiting, sem_t *peer) {
    full_fence();   /* SYNC POINT (Dekker, waker side) */
    uint64_t w = ld_rlx(s->seg.mem + peer_waiting);
    if (w && w != s->posted) {
        s->posted = w;
        if (peer != NULL)   /* an image without semaphores (conformance vectors) */
            sem_post(peer);
    }
}

/* _End._sleep: spin with sched_yield, then sleep under the Dekker protocol until ready()
 * (1) or the deadline (0); < 0 an error from ready. */
static int end_sleep(shimmy_stream *s, uint64_t waiting, sem_t *mine,
                     int (*ready)(shimmy_stream *), double deadline) {
    double spin_end = mono_now() + S_SPIN;
    if (deadline >= 0 && spin_end > deadline)
        spin_end = deadline;
    int rc;
    if (deadline >= 0 && mono_now() >= deadline)
        return ready(s);   /* no wait at all: nothing stored */
    while (mono_now() < spin_end) {
        if ((rc = ready(s)) != 0)
            return rc;
        sched_yield();
    }
    for (;;) {
        st_rlx(s->seg.mem + waiting, ++s->epoch);
        full_fence();   /* SYNC POINT (Dekker, sleeper side) */
        if ((rc = ready(s)) != 0)
            break;
        double wait = S_MAX_SLEEP;
        if (deadline >= 0) {
            wait = deadline - mono_now();
            if (wait <= 0)
                break;
            if (wait > S_MAX_SLEEP)
                wait = S_MAX_SLEEP;
        }
        if (mine != NULL)
            sem_wait_for(mine, wait);
    }
    st_rlx(s->seg.mem + waiting, 0);
    return rc;
}

/* ---- the writer -------------------------------------------------------------------------- */

static int reader_gone(shimmy_stream *s) {
    return word(s, S_R_CLOSED) || word(s, S_R_BROKEN) || word(s, OFF_RETIRED);
}

static int broken(shimmy_stream *s) {
    char why[128];
    if (word(s, OFF_RETIRED))
        snprintf(why, sizeof why, "the daemon retired the stream (deleted or restarted)");
    else if (word(s, S_R_BROKEN))
        snprintf(why, sizeof why, "its reader (pid %u) died", peer_pid(s, 0));
    else
        snprintf(why, sizeof why, "its reader (pid %u) closed its end", peer_pid(s, 0));
    return shm_fail(SHIMMY_E_STREAM_BROKEN, "stream '%s': %s; nothing more can be written",
                    s->name, why);
}

static int space_ready(shimmy_stream *s) {
    uint64_t head = word(s, S_HEAD);
    int rc = check_span(s, head, s->tail);
    if (rc < 0)
        return rc;
    return s->seg.cap - (s->tail - head) > 0 || reader_gone(s);
}

/* WriterCursor.write_nowait: copy what fits now, in pieces, each committed. */
static int64_t write_nowait(shimmy_stream *s, const uint8_t *data, uint64_t n) {
    if (reader_gone(s))
        return broken(s);
    uint64_t done = 0, cap = s->seg.cap;
    while (done < n) {
        uint64_t free_ = cap - (s->tail - s->head);
        if (free_ == 0) {
            s->head = word(s, S_HEAD);   /* SYNC POINT (acquire head) */
            int rc = check_span(s, s->head, s->tail);
            if (rc < 0)
                return rc;
            free_ = cap - (s->tail - s->head);
            if (free_ == 0)
                break;
        }
        uint64_t k = n - done;
        if (k > free_)
            k = free_;
        if (k > s->piece)
            k = s->piece;
        uint64_t off = s->tail & s->seg.mask, first = cap - off;
        if (k <= first) {
            memcpy(s->seg.data + off, data + done, k);
        } else {   /* the write wraps: split it at the end of the data area */
            memcpy(s->seg.data + off, data + done, first);
            memcpy(s->seg.data, data + done + first, k - first);
        }
        done += k;
        s->tail += k;
        st_rel(s->seg.mem + S_TAIL, s->tail);   /* SYNC POINT (commit) */
        post_peer_if_waiting(s, S_R_WAITING, s->sem_r);
    }
    return (int64_t)done;
}

int64_t stream_write_nowait(shimmy_stream *s, const void *data, size_t n) {
    return write_nowait(s, data, n);
}

int shimmy_stream_write(shimmy_stream *s, const void *data, size_t n, double timeout,
                        size_t *written) {
    if (written != NULL)
        *written = 0;
    if (s->role != SHIMMY_WRITER)
        return shm_fail(SHIMMY_E_INVALID_ARGUMENT, "stream '%s': this end is the reader",
                        s->name);
    int64_t got = write_nowait(s, data, n);
    if (got < 0)
        return (int)got;
    uint64_t done = (uint64_t)got;
    double deadline = timeout < 0 ? -1 : mono_now() + timeout;
    while (done < n) {
        int rc = end_sleep(s, S_W_WAITING, s->sem_w, space_ready, deadline);
        if (rc < 0)
            return rc;
        if (rc == 0) {
            char secs[32], pid[16];
            fmt_secs(secs, sizeof secs, timeout);
            peer_pid_text(s, 0, pid);
            if (written != NULL)
                *written = done;
            return shm_fail(SHIMMY_E_BACKPRESSURE_TIMEOUT, "stream '%s': ring full for %s s "
                            "(capacity %llu bytes, reader pid %s); wrote %llu of %zu bytes",
                            s->name, secs, (unsigned long long)s->seg.cap, pid,
                            (unsigned long long)done, n);
        }
        got = write_nowait(s, (const uint8_t *)data + done, n - done);
        if (got < 0)
            return (int)got;
        done += (uint64_t)got;
        if (written != NULL)
            *written = done;
    }
    if (written != NULL)
        *written = done;
    return 0;
}

/* ---- the reader -------------------------------------------------------------------------- */

static int64_t available(shimmy_stream *s) {
    uint64_t avail = s->tail - s->head;
    if (avail == 0) {
        s->tail = word(s, S_TAIL);   /* SYNC POINT (acquire tail) */
        int rc = check_span(s, s->head, s->tail);
        if (rc < 0)
            return rc;
        avail = s->tail - s->head;
    }
    return (int64_t)avail;
}

/* ReaderCursor.at_end: with nothing buffered, 0 more may come, 1 clean end, < 0 broken. */
static int at_end(shimmy_stream *s) {
    /* eof / broken first, then tail: the writer stored tail before eof */
    uint64_t eof = word(s, S_EOF);
    uint64_t gone = word(s, S_W_BROKEN) || word(s, OFF_RETIRED);
    if (!eof && !gone)
        return 0;
    int64_t avail = available(s);
    if (avail != 0)
        return avail < 0 ? (int)avail : 0;
    if (eof)
        return 1;
    if (word(s, OFF_RETIRED))
        return shm_fail(SHIMMY_E_STREAM_BROKEN, "stream '%s': the daemon retired the stream "
                        "(deleted or restarted)", s->name);
    return shm_fail(SHIMMY_E_STREAM_BROKEN, "stream '%s': its writer (pid %u) died without "
                    "closing; %llu bytes were delivered", s->name, peer_pid(s, 1),
                    (unsigned long long)s->head);
}

static int data_ready(shimmy_stream *s) {
    return word(s, S_TAIL) != s->head || word(s, S_EOF) || word(s, S_W_BROKEN) ||
           word(s, OFF_RETIRED);
}

int64_t shimmy_stream_read(shimmy_stream *s, void *buf, size_t n, double timeout) {
    if (s->role != SHIMMY_READER)
        return shm_fail(SHIMMY_E_INVALID_ARGUMENT, "stream '%s': this end is the writer",
                        s->name);
    if (n == 0)
        return 0;
    int64_t avail = available(s);
    double deadline = timeout < 0 ? -1 : mono_now() + timeout;
    while (avail == 0) {
        int rc = at_end(s);
        if (rc != 0)
            return rc < 0 ? rc : 0;
        if ((avail = available(s)) != 0)
            break;
        rc = end_sleep(s, S_R_WAITING, s->sem_r, data_ready, deadline);
        if (rc < 0)
            return rc;
        if (rc == 0) {
            if ((avail = available(s)) != 0)
                break;
            if ((rc = at_end(s)) != 0)
                return rc < 0 ? rc : 0;
            char secs[32], pid[16];
            fmt_secs(secs, sizeof secs, timeout);
            peer_pid_text(s, 1, pid);
            return shm_fail(SHIMMY_E_TIMEOUT, "stream '%s': no data within %s s (writer pid "
                            "%s)", s->name, secs, pid);
        }
    }
    if (avail < 0)
        return avail;
    uint64_t k = (uint64_t)avail < n ? (uint64_t)avail : n;
    uint64_t off = s->head & s->seg.mask, first = s->seg.cap - off;
    if (k <= first) {
        memcpy(buf, s->seg.data + off, k);
    } else {
        memcpy(buf, s->seg.data + off, first);
        memcpy((uint8_t *)buf + first, s->seg.data, k - first);
    }
    s->head += k;
    st_rel(s->seg.mem + S_HEAD, s->head);   /* SYNC POINT (release): after the copy */
    post_peer_if_waiting(s, S_W_WAITING, s->sem_w);
    return (int64_t)k;
}

void shimmy_stream_close(shimmy_stream *s) {
    if (s == NULL)
        return;
    stream_finish(s);
    tell_daemon_closed(s);
    sem_close(s->sem_r);
    sem_close(s->sem_w);
    seg_unmap(&s->seg);
    free(s);
}
