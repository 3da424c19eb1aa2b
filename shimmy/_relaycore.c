/* The peer relay's per-batch paths in C (daemon/peer/mirror.py, daemon/peer/tcp.py).
 *
 * MirrorSource and MirrorReplica subclass the two types below (daemon/peer/relay.py loads this
 * module).  Each method runs the common case of its Python twin with the same loads and stores
 * in the same order, and hands every other case back to Python before changing anything:
 *
 *   SourceCore.pump  MirrorSource._loop over a plain TCP link: the sleep on the mirror's slot
 *                    semaphore, and each reliable batch that needs neither a jump nor a cut
 *                    (one ``sendmsg`` of PUT header, ring bytes and COMMIT header).
 *   ReplicaCore.land Link.run_reader's PUT, payload and COMMIT of one replica when the whole
 *                    batch sits in the link's read-ahead buffer (MirrorReplica.put_target, the
 *                    copy, MirrorReplica.commit), with the commit's wake-up handshake.
 *
 * Why: a 64-byte round trip between two daemons crosses four of these hops in series, and in
 * Python each cost about 10 us of interpreter on top of its system calls (docs/performance.md,
 * "The cross-node round trip").  The Python twins stay the reference: they run alone where this
 * module is not built, with SHIMMY_PURE_PYTHON=1, on TLS links and on RDMA, and the tests run
 * both ways.  The wire format (daemon/peer/tcp.py) and the ring offsets (_ringcore.h) are
 * exported and compared with the Python side at import, so a drift refuses this module.
 *
 * Memory ordering as in _ringcore.c: release stores of the commit words, acquire loads of tail,
 * a relaxed head store followed by a release fence before any byte it guards is overwritten,
 * and a sequentially consistent fence in each wake-up (Dekker) pair.
 */
#include "_ringcore.h"

#include <errno.h>
#include <fcntl.h>
#include <semaphore.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>

/* The peer wire (daemon/peer/tcp.py): HDR = "<BxxxIQQQQ", kinds. */
#define HDR_SIZE 40
#define K_PUT 2
#define K_COMMIT 3
#define SLEEP_NS 50000000L   /* a mirror's sleep is bounded, as MirrorSource._loop's 0.05 s */

static PyObject *str_wakeups, *str_posted_w0, *str_wake, *str_on_commit, *str_acquire,
    *str_release, *str_closed, *str_tclosed, *str_stats, *str_sock, *str_lock, *str_bytes_sent, *str_batches_sent;

static inline void put_hdr(unsigned char *h, unsigned kind, uint32_t mid, uint64_t a, uint64_t b,
                           uint64_t c) {
    memset(h, 0, HDR_SIZE);
    h[0] = (unsigned char)kind;
    memcpy(h + 4, &mid, 4);
    memcpy(h + 8, &a, 8);
    memcpy(h + 16, &b, 8);
    memcpy(h + 24, &c, 8);
}

static inline uint64_t frame_seq(Mapping *m, uint64_t p) {
    uint64_t seq;
    memcpy(&seq, m->data + (p & m->mask) + 8, 8);
    return seq;
}

/* d[key] += n for a dict of ints (the link's and the mirrors' counters). */
static int dict_add(PyObject *d, PyObject *key, uint64_t n) {
    PyObject *old = PyDict_GetItemWithError(d, key);
    if (old == NULL)
        return PyErr_Occurred() ? -1 : 0;
    PyObject *add = PyLong_FromUnsignedLongLong(n);
    if (add == NULL)
        return -1;
    PyObject *sum = PyNumber_Add(old, add);
    Py_DECREF(add);
    if (sum == NULL)
        return -1;
    int rc = PyDict_SetItem(d, key, sum);
    Py_DECREF(sum);
    return rc;
}

/* ---- the replica (MirrorReplica) ------------------------------------------------------------ */

typedef struct {
    PyObject_HEAD
    Mapping m;
    unsigned long long cap;
    /* MirrorReplica's state, shared with its Python paths as attributes of the same names */
    unsigned long long tail, head, next, same_from, off, seq_off;
    long long seq_end;                          /* _seq_end: -1 until a message landed */
    unsigned long long n_bytes, n_batches, n_messages;
    char reset_needed;
} ReplicaCore;

static PyObject *replica_attach(ReplicaCore *r, PyObject *args) {
    PyObject *mm;
    unsigned long long data_offset, capacity;
    if (!PyArg_ParseTuple(args, "OKK", &mm, &data_offset, &capacity))
        return NULL;
    if (mapping_attach(&r->m, mm, data_offset, capacity, 0) < 0)
        return NULL;
    r->cap = capacity;
    Py_RETURN_NONE;
}

/* After the commit's tail store, as MirrorReplica._commit: the wake-up handshake (_ringcore.h,
 * SYNC POINT inside), then the credit hook (on_commit). */
static int replica_after_commit(ReplicaCore *r) {
    if (wake_after_commit((PyObject *)r, r->m.mem, str_wakeups, str_posted_w0, str_wake) < 0)
        return -1;
    PyObject *hook = PyObject_GetAttr((PyObject *)r, str_on_commit);
    if (hook == NULL)
        return -1;
    if (hook != Py_None) {
        PyObject *res = PyObject_CallNoArgs(hook);
        Py_DECREF(hook);
        if (res == NULL)
            return -1;
        Py_DECREF(res);
        return 0;
    }
    Py_DECREF(hook);
    return 0;
}

/* land(buf, r0, r1, mid, start, end, guard) -> the read-ahead index after the batch's COMMIT,
 * or -1 (nothing changed: the Python path takes the batch).  ``buf[r0:r1]`` are the bytes
 * received after a PUT header of mirror ``mid`` (start, end, guard in the source's positions).
 * Taken here: the payload and a COMMIT of the same mirror for exactly this batch (no torn
 * range) are all in the buffer, the batch continues our tail, no renumbering is due, and the
 * overwrite guard, if it must move, moves within the source's frame boundaries. */
static PyObject *replica_land(ReplicaCore *r, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 7) {
        PyErr_SetString(PyExc_TypeError, "land(buf, r0, r1, mid, start, end, guard)");
        return NULL;
    }
    Py_ssize_t r0 = PyLong_AsSsize_t(args[1]), r1 = PyLong_AsSsize_t(args[2]);
    unsigned long mid = PyLong_AsUnsignedLong(args[3]);
    unsigned long long a = PyLong_AsUnsignedLongLong(args[4]);
    unsigned long long b = PyLong_AsUnsignedLongLong(args[5]);
    unsigned long long c = PyLong_AsUnsignedLongLong(args[6]);
    if (PyErr_Occurred())
        return NULL;
    if (r->m.mem == NULL || r->reset_needed || r->seq_off || b <= a)
        return PyLong_FromLong(-1);
    uint64_t n = b - a, cap = r->cap;
    if (r0 < 0 || r1 < r0 || (uint64_t)(r1 - r0) < n + HDR_SIZE || n > cap)
        return PyLong_FromLong(-1);
    Py_buffer buf;
    if (PyObject_GetBuffer(args[0], &buf, PyBUF_SIMPLE) < 0)
        return NULL;
    if (buf.len < r1) {
        PyBuffer_Release(&buf);
        return PyLong_FromLong(-1);
    }
    const unsigned char *src = (const unsigned char *)buf.buf + r0;
    const unsigned char *h = src + n;   /* the header after the payload */
    uint32_t cmid;
    uint64_t ctail, clast, cpad;
    memcpy(&cmid, h + 4, 4);
    memcpy(&ctail, h + 8, 8);
    memcpy(&clast, h + 16, 8);
    memcpy(&cpad, h + 24, 8);
    uint64_t off = r->off, start = a + off, end = b + off, guard = c + off;
    uint64_t tail = r->tail, last = clast ? clast + off : 0;
    /* The cases MirrorReplica.put_target and .commit handle otherwise or refuse (they raise
     * ReplicaViolation naming the fault): all left to them. */
    if (h[0] != K_COMMIT || cmid != mid || cpad || ctail + off != end || start != r->next ||
        start != tail || guard > tail || guard + cap < end ||
        (clast && !(tail <= last && last < end))) {
        PyBuffer_Release(&buf);
        return PyLong_FromLong(-1);
    }
    char *mem = r->m.mem;
    if (end > cap && r->head < end - cap) {
        uint64_t need = end - cap;
        if (guard < r->same_from) {   /* the guard may fall inside a hole we PAD-ed: Python walks */
            PyBuffer_Release(&buf);
            return PyLong_FromLong(-1);
        }
        /* Never past our last frame (invariant (A)); the source cuts batches so need <= last. */
        uint64_t our_last = LOAD_RLX(mem + OFF_LAST);
        r->head = (guard <= our_last || need > our_last) ? guard : our_last;
        /* SYNC POINT (overwrite guard, as put_target): head stored before any byte of the
         * frames it passes is overwritten by the copy below. */
        __atomic_store_n((uint64_t *)(mem + OFF_HEAD), r->head, __ATOMIC_RELAXED);
        __atomic_thread_fence(__ATOMIC_RELEASE);
    }
    r->next = end;
    uint64_t at = start & r->m.mask;
    if (at + n <= cap) {
        memcpy(r->m.data + at, src, (size_t)n);
    } else {
        uint64_t first = cap - at;
        memcpy(r->m.data + at, src, (size_t)first);
        memcpy(r->m.data, src + first, (size_t)(n - first));
    }
    PyBuffer_Release(&buf);
    r->n_bytes += end - tail;
    r->n_batches += 1;
    if (clast) {
        long long seq_end = (long long)(frame_seq(&r->m, last) + 1);
        if (r->seq_end >= 0 && seq_end > r->seq_end)
            r->n_messages += (unsigned long long)(seq_end - r->seq_end);
        r->seq_end = seq_end;
        __atomic_store_n((uint64_t *)(mem + OFF_LAST), last, __ATOMIC_RELAXED);
    }
    r->tail = end;
    /* SYNC POINT (commit): every byte of the batch was copied before this release store. */
    STORE_REL(mem + OFF_TAIL, end);
    if (replica_after_commit(r) < 0)
        return NULL;
    return PyLong_FromSsize_t(r0 + (Py_ssize_t)n + HDR_SIZE);
}

static PyMemberDef replica_members[] = {
    {"tail", T_ULONGLONG, offsetof(ReplicaCore, tail), 0, "our committed tail"},
    {"head", T_ULONGLONG, offsetof(ReplicaCore, head), 0, "the head as last stored"},
    {"next", T_ULONGLONG, offsetof(ReplicaCore, next), 0, "where the next put must start"},
    {"same_from", T_ULONGLONG, offsetof(ReplicaCore, same_from), 0,
     "from here on our frame boundaries equal the source's"},
    {"off", T_ULONGLONG, offsetof(ReplicaCore, off), 0, "our positions minus the source's"},
    {"seq_off", T_ULONGLONG, offsetof(ReplicaCore, seq_off), 0, "our numbers minus the source's"},
    {"_seq_end", T_LONGLONG, offsetof(ReplicaCore, seq_end), 0, "next number; -1: none yet"},
    {"_bytes", T_ULONGLONG, offsetof(ReplicaCore, n_bytes), 0, "bytes committed"},
    {"_batches", T_ULONGLONG, offsetof(ReplicaCore, n_batches), 0, "batches committed"},
    {"_messages", T_ULONGLONG, offsetof(ReplicaCore, n_messages), 0, "messages committed"},
    {"reset_needed", T_BOOL, offsetof(ReplicaCore, reset_needed), 0, "being retired"},
    {NULL}};

static PyMethodDef replica_methods[] = {
    {"_attach", (PyCFunction)replica_attach, METH_VARARGS,
     "_attach(mmap, data_offset, capacity): map the replica ring for land()"},
    {"_detach", (PyCFunction)core_detach, METH_NOARGS, "release the mapping's buffer"},
    {"land", (PyCFunction)(void (*)(void))replica_land, METH_FASTCALL,
     "land(buf, r0, r1, mid, start, end, guard) -> next read-ahead index | -1"},
    {NULL}};

static PyTypeObject ReplicaCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shimmy._relaycore.ReplicaCore",
    .tp_basicsize = sizeof(ReplicaCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "C fast path of MirrorReplica (subclassed there)",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = core_dealloc,
    .tp_traverse = core_traverse,
    .tp_methods = replica_methods,
    .tp_members = replica_members,
};

/* ---- the source (MirrorSource) -------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    Mapping m;
    unsigned long long cap;
    sem_t *sem;                 /* the mirror's slot semaphore (sem_open'd by name) */
    uint64_t waiting_off;       /* byte offset of the slot's waiting byte */
    uint32_t mid;               /* the mirror's id on the link */
    int reliable;
    int err;                    /* errno of the send that failed (pump returned PUMP_FAILED) */
    /* MirrorSource's state, shared with its Python paths as attributes of the same names */
    unsigned long long pos;
    long long rlast;            /* the replica's last frame (a lower bound: may be < 0) */
    long long seq_end;          /* _seq_end: -1 until known */
    unsigned long long n_bytes, n_batches, n_messages;
    unsigned char epoch;        /* _epoch: the last sleep epoch stored in the waiting byte */
    char stopped;
} SourceCore;

enum { PUMP_PYTHON = 0, PUMP_RETIRED = 1, PUMP_STOPPED = 2, PUMP_FAILED = 3, PUMP_CLOSED = 4 };

static void source_close_sem(SourceCore *s) {
    if (s->sem != NULL && s->sem != SEM_FAILED)
        sem_close(s->sem);
    s->sem = NULL;
}

static void source_dealloc(PyObject *self) {
    source_close_sem((SourceCore *)self);
    core_dealloc(self);
}

static PyObject *source_detach(SourceCore *s, PyObject *unused) {
    source_close_sem(s);
    return core_detach((PyObject *)s, unused);
}

/* _attach(mmap, data_offset, capacity, waiting_offset, sem_name, mid, reliable) */
static PyObject *source_attach(SourceCore *s, PyObject *args) {
    PyObject *mm;
    unsigned long long data_offset, capacity, waiting_off;
    const char *sem_name;
    int reliable;
    unsigned int mid;
    if (!PyArg_ParseTuple(args, "OKKKsIp", &mm, &data_offset, &capacity, &waiting_off,
                          &sem_name, &mid, &reliable))
        return NULL;
    if (waiting_off < OFF_WAITING || waiting_off >= CONTROL_SIZE) {
        PyErr_SetString(PyExc_ValueError, "relay core: waiting byte outside the control page");
        return NULL;
    }
    sem_t *sem = sem_open(sem_name, 0);
    if (sem == SEM_FAILED)
        return PyErr_SetFromErrnoWithFilename(PyExc_OSError, sem_name);
    if (mapping_attach(&s->m, mm, data_offset, capacity, 0) < 0) {
        sem_close(sem);
        return NULL;
    }
    source_close_sem(s);
    s->sem = sem;
    s->cap = capacity;
    s->waiting_off = waiting_off;
    s->mid = mid;
    s->reliable = reliable;
    Py_RETURN_NONE;
}

/* Send iov[0..cnt) whole under the link's lock, as Link.send (one message never interleaves
 * with another thread's).  0 sent; PUMP_CLOSED (link or transport closed: Python raises);
 * PUMP_FAILED (s->err holds errno: Python closes the link and raises); -1 a Python error. */
static int source_send(SourceCore *s, PyObject *link, PyObject *transport, struct iovec *iov,
                       int cnt, size_t total) {
    for (int i = 0; i < 2; i++) {
        PyObject *closed = PyObject_GetAttr(i ? transport : link, i ? str_tclosed : str_closed);
        if (closed == NULL)
            return -1;
        int yes = PyObject_IsTrue(closed);
        Py_DECREF(closed);
        if (yes)
            return yes < 0 ? -1 : PUMP_CLOSED;
    }
    PyObject *lock = PyObject_GetAttr(link, str_lock);
    if (lock == NULL)
        return -1;
    PyObject *got = PyObject_CallMethodNoArgs(lock, str_acquire);
    if (got == NULL) {
        Py_DECREF(lock);
        return -1;
    }
    Py_DECREF(got);
    /* The descriptor is read under the lock, as the GIL goes: a link closed meanwhile shows
     * here (-1), not as a send on a number another socket may have taken since. */
    PyObject *sock = PyObject_GetAttr(link, str_sock);
    int fd = sock == NULL ? -1 : PyObject_AsFileDescriptor(sock);
    Py_XDECREF(sock);
    if (fd < 0) {
        PyErr_Clear();
        PyObject *rel = PyObject_CallMethodNoArgs(lock, str_release);
        Py_DECREF(lock);
        if (rel == NULL)
            return -1;
        Py_DECREF(rel);
        return PUMP_CLOSED;
    }
    int err = 0;
    size_t whole = total;
    Py_BEGIN_ALLOW_THREADS
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = (size_t)cnt};
    while (total) {
        ssize_t k = sendmsg(fd, &msg, MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            err = errno;
            break;
        }
        total -= (size_t)k;
        while (k > 0 && msg.msg_iovlen) {   /* a partial send: step past what left */
            if ((size_t)k >= msg.msg_iov->iov_len) {
                k -= (ssize_t)msg.msg_iov->iov_len;
                msg.msg_iov++;
                msg.msg_iovlen--;
            } else {
                msg.msg_iov->iov_base = (char *)msg.msg_iov->iov_base + k;
                msg.msg_iov->iov_len -= (size_t)k;
                k = 0;
            }
        }
    }
    Py_END_ALLOW_THREADS
    PyObject *rel = PyObject_CallMethodNoArgs(lock, str_release);
    Py_DECREF(lock);
    if (rel == NULL)
        return -1;
    Py_DECREF(rel);
    if (err) {
        s->err = err;
        return PUMP_FAILED;
    }
    PyObject *stats = PyObject_GetAttr(link, str_stats);
    if (stats == NULL)
        return -1;
    int rc = dict_add(stats, str_bytes_sent, whole);
    if (rc == 0)
        rc = dict_add(stats, str_batches_sent, 1);
    Py_DECREF(stats);
    return rc;
}

/* MirrorSource._count: the batch's bytes, and its messages from the last frame's number. */
static void source_count(SourceCore *s, uint64_t n, uint64_t last) {
    s->n_bytes += n;
    s->n_batches += 1;
    if (!last)
        return;
    long long seq_end = (long long)(frame_seq(&s->m, last) + 1);
    if (LOAD_RLX(s->m.mem + OFF_HEAD) > last)   /* overwritten meanwhile (lossy): skip it */
        return;
    if (s->seq_end >= 0 && seq_end > s->seq_end)
        s->n_messages += (unsigned long long)(seq_end - s->seq_end);
    s->seq_end = seq_end;
}

/* The sleep of MirrorSource._loop: waiting byte, FENCE, re-check, bounded wait.  0 woken (or
 * there was no need, or the bound passed), PUMP_RETIRED the bound passed on a ring the daemon
 * retired (its channel was deleted), PUMP_STOPPED. */
static int source_sleep(SourceCore *s) {
    char *mem = s->m.mem;
    unsigned char *waiting = (unsigned char *)mem + s->waiting_off;
    s->epoch = (unsigned char)(s->epoch % 255 + 1);   /* ring.next_epoch: 1..255 */
    __atomic_store_n(waiting, s->epoch, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);   /* SYNC POINT (Dekker, sleeper side) */
    int rc = 0;
    if (LOAD_ACQ(mem + OFF_TAIL) == s->pos && !s->stopped) {
        struct timespec until;
        clock_gettime(CLOCK_MONOTONIC, &until);
        until.tv_nsec += SLEEP_NS;
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec += 1;
            until.tv_nsec -= 1000000000L;
        }
        int r, e = 0;
        sem_t *sem = s->sem;
        Py_BEGIN_ALLOW_THREADS
        do {
            r = sem_clockwait(sem, CLOCK_MONOTONIC, &until);
        } while (r < 0 && (e = errno) == EINTR);
        Py_END_ALLOW_THREADS
        if (s->m.mem == NULL)   /* detached meanwhile (the channel went) */
            return PUMP_STOPPED;
        if (r < 0 && e == ETIMEDOUT && LOAD_RLX(mem + OFF_RETIRED))
            rc = PUMP_RETIRED;
    }
    __atomic_store_n(waiting, 0, __ATOMIC_RELAXED);
    return s->stopped ? PUMP_STOPPED : rc;
}

/* pump(link, transport) -> PUMP_*: MirrorSource._loop's sleeps and plain batches until a case
 * for Python (PUMP_PYTHON: run one turn of the Python loop), a retired ring, stop, or a send
 * that failed. */
static PyObject *source_pump(SourceCore *s, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "pump(link, transport)");
        return NULL;
    }
    PyObject *link = args[0], *transport = args[1];
    unsigned char put[HDR_SIZE], commit[HDR_SIZE];
    for (;;) {
        if (s->stopped || s->m.mem == NULL || s->sem == NULL)
            return PyLong_FromLong(PUMP_STOPPED);
        char *mem = s->m.mem;
        uint64_t pos = s->pos, cap = s->cap;
        /* SYNC POINT (acquire): pairs with the publisher's tail store (RingWriter._commit). */
        uint64_t tail = LOAD_ACQ(mem + OFF_TAIL);
        if (tail == pos) {
            int rc = source_sleep(s);
            if (rc)
                return PyLong_FromLong(rc);
            continue;
        }
        /* ``last`` is stored before tail: last < tail proves it belongs to this tail.  The
         * publisher between its two stores, a lap, a batch to cut, and every lossy batch (its
         * seqlock check and torn ranges): the Python turn. */
        uint64_t last = LOAD_RLX(mem + OFF_LAST);
        /* SYNC POINT (validate): head loaded after tail (pairs with RingWriter._make_room). */
        uint64_t head = LOAD_RLX(mem + OFF_HEAD);
        if (!s->reliable || last >= tail || tail < pos || head > pos || tail - pos > cap ||
            (long long)tail > s->rlast + (long long)cap)
            return PyLong_FromLong(PUMP_PYTHON);
        uint64_t n = tail - pos, at = pos & s->m.mask;
        struct iovec iov[4];
        int cnt = 0;
        put_hdr(put, K_PUT, s->mid, pos, tail, head);
        iov[cnt++] = (struct iovec){put, HDR_SIZE};
        if (at + n <= cap) {
            iov[cnt++] = (struct iovec){s->m.data + at, (size_t)n};
        } else {
            iov[cnt++] = (struct iovec){s->m.data + at, (size_t)(cap - at)};
            iov[cnt++] = (struct iovec){s->m.data, (size_t)(n - (cap - at))};
        }
        /* Our slot keeps the publisher off these bytes: one send for PUT and COMMIT.  pos moves
         * first (a credit for this batch may arrive before the send returns). */
        put_hdr(commit, K_COMMIT, s->mid, tail, last, 0);
        iov[cnt++] = (struct iovec){commit, HDR_SIZE};
        s->pos = tail;
        int rc = source_send(s, link, transport, iov, cnt, n + 2 * HDR_SIZE);
        if (rc)
            return rc < 0 ? NULL : PyLong_FromLong(rc);
        if (s->m.mem == NULL)   /* unmapped while we sent (the GIL was let go) */
            return PyLong_FromLong(PUMP_STOPPED);
        if (last)
            s->rlast = (long long)last;
        source_count(s, n, last);
    }
}

static PyMemberDef source_members[] = {
    {"pos", T_ULONGLONG, offsetof(SourceCore, pos), 0, "next stream position to send"},
    {"rlast", T_LONGLONG, offsetof(SourceCore, rlast), 0, "the replica's last frame"},
    {"_seq_end", T_LONGLONG, offsetof(SourceCore, seq_end), 0, "next number; -1: unknown"},
    {"_bytes", T_ULONGLONG, offsetof(SourceCore, n_bytes), 0, "bytes sent"},
    {"_batches", T_ULONGLONG, offsetof(SourceCore, n_batches), 0, "batches sent"},
    {"_messages", T_ULONGLONG, offsetof(SourceCore, n_messages), 0, "messages sent"},
    {"_epoch", T_UBYTE, offsetof(SourceCore, epoch), 0, "the last sleep epoch"},
    {"stopped", T_BOOL, offsetof(SourceCore, stopped), 0, "stop at the next look"},
    {"_errno", T_INT, offsetof(SourceCore, err), READONLY, "errno of the failed send"},
    {NULL}};

static PyMethodDef source_methods[] = {
    {"_attach", (PyCFunction)source_attach, METH_VARARGS,
     "_attach(mmap, data_offset, capacity, waiting_offset, sem_name, mid, reliable)"},
    {"_detach", (PyCFunction)source_detach, METH_NOARGS,
     "release the mapping's buffer and the semaphore"},
    {"pump", (PyCFunction)(void (*)(void))source_pump, METH_FASTCALL,
     "pump(link, transport) -> PUMP_* (MirrorSource._loop's common case in C)"},
    {NULL}};

static PyTypeObject SourceCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shimmy._relaycore.SourceCore",
    .tp_basicsize = sizeof(SourceCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "C fast path of MirrorSource (subclassed there)",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = source_dealloc,
    .tp_traverse = core_traverse,
    .tp_methods = source_methods,
    .tp_members = source_members,
};

static struct PyModuleDef relaycore_module = {
    PyModuleDef_HEAD_INIT, "shimmy._relaycore",
    "C fast paths of the peer relay (daemon/peer/mirror.py, daemon/peer/relay.py)", -1, NULL,
};

PyMODINIT_FUNC PyInit__relaycore(void) {
#define INTERN(var, s) if ((var = PyUnicode_InternFromString(s)) == NULL) return NULL
    INTERN(str_wakeups, "wakeups");
    INTERN(str_posted_w0, "posted_w0");
    INTERN(str_wake, "wake");
    INTERN(str_on_commit, "on_commit");
    INTERN(str_acquire, "acquire");
    INTERN(str_release, "release");
    INTERN(str_closed, "closed");
    INTERN(str_tclosed, "_closed");
    INTERN(str_stats, "stats");
    INTERN(str_sock, "sock");
    INTERN(str_lock, "lock");
    INTERN(str_bytes_sent, "bytes_sent");
    INTERN(str_batches_sent, "batches_sent");
#undef INTERN
    if (PyType_Ready(&ReplicaCoreType) < 0 || PyType_Ready(&SourceCoreType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&relaycore_module);
    if (m == NULL)
        return NULL;
#define EXPORT(name) PyModule_AddIntConstant(m, #name, name) < 0
    if (EXPORT(OFF_RETIRED) || EXPORT(OFF_TAIL) || EXPORT(OFF_HEAD) || EXPORT(OFF_LAST) ||
        EXPORT(OFF_WAITING) ||
        EXPORT(CONTROL_SIZE) || EXPORT(HEADER) || EXPORT(HDR_SIZE) || EXPORT(K_PUT) ||
        EXPORT(K_COMMIT) || EXPORT(PUMP_PYTHON) || EXPORT(PUMP_RETIRED) ||
        EXPORT(PUMP_STOPPED) || EXPORT(PUMP_FAILED) || EXPORT(PUMP_CLOSED) ||
        PyModule_AddObject(m, "WIDE_BIT", PyLong_FromUnsignedLongLong(WIDE_BIT)) < 0)
        goto fail;
#undef EXPORT
    Py_INCREF(&ReplicaCoreType);
    if (PyModule_AddObject(m, "ReplicaCore", (PyObject *)&ReplicaCoreType) < 0) {
        Py_DECREF(&ReplicaCoreType);
        goto fail;
    }
    Py_INCREF(&SourceCoreType);
    if (PyModule_AddObject(m, "SourceCore", (PyObject *)&SourceCoreType) < 0) {
        Py_DECREF(&SourceCoreType);
        goto fail;
    }
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
