/* The per-message paths of the pub/sub ring in C (shimmy/ring.py, docs/ring-format.md).
 *
 * ring.RingWriter and ring.RingReader subclass the two types below.  Each method here runs the
 * common case of its Python twin in ring.py (``_publish_py``, ``_publish_many_py``,
 * ``_take_bytes_py``, ``_take_many_bytes_py``) with the same loads and stores in the same order,
 * and hands every other case (wrap padding, room to make, a lapped or lossy reader, a frame
 * that fails validation, a bytes-like object that is not one contiguous run of bytes) to that
 * Python twin, before changing any state.  The Python twins stay the reference: they run alone
 * where this module is not built, or with SHIMMY_PURE_PYTHON=1, and the tests run both ways.
 *
 * Memory ordering.  The Python paths rely on x86-64 TSO and on aligned 8-byte stores through a
 * memoryview being single `mov`s.  Here the same order is stated to the compiler as well:
 * the commit words are stored with release semantics (every earlier store, the frame bytes,
 * is visible first), the tail is loaded with acquire semantics (no later load, the frame bytes,
 * is hoisted above it), an acquire fence keeps the frame loads before the overwrite guard's
 * load of head, and the wake-up handshake uses a full (sequentially consistent) fence between
 * the tail store and the load of the waiting bytes, as ring.fence() does.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

/* Offsets: the same constants as ring.py (checked at import by ring.py against its own). */
#define OFF_RETIRED 40
#define OFF_TAIL 320
#define OFF_HEAD 328
#define OFF_LAST 336
#define OFF_WAITING 448
#define HEADER 16
#define WIDE_BIT ((uint64_t)1 << 56)

#define LOAD_ACQ(p) __atomic_load_n((uint64_t *)(p), __ATOMIC_ACQUIRE)
#define LOAD_RLX(p) __atomic_load_n((uint64_t *)(p), __ATOMIC_RELAXED)
#define STORE_REL(p, v) __atomic_store_n((uint64_t *)(p), (v), __ATOMIC_RELEASE)

static PyObject *str_publish_many_py, *str_claim_py, *str_mv, *str_take_py, *str_publish_py, *str_publish_one_of_batch, *str_take_bytes_py,
    *str_take_many_bytes_py, *str_wakeups, *str_posted_w0, *str_wake;

/* ---- the mapping ---------------------------------------------------------------------------- */

typedef struct {
    Py_buffer buf;          /* a buffer export of the ring's mmap; buf.obj NULL when detached */
    char *mem;              /* start of the mapping */
    char *data;             /* start of the frame area (mem + data_offset) */
    uint64_t mask;          /* capacity - 1 */
    uint64_t max_message;   /* largest payload */
} Mapping;

static int mapping_attach(Mapping *m, PyObject *mm, unsigned long long data_offset,
                          unsigned long long capacity, unsigned long long max_message) {
    if (m->buf.obj != NULL) {
        PyErr_SetString(PyExc_ValueError, "ring core already attached");
        return -1;
    }
    if (PyObject_GetBuffer(mm, &m->buf, PyBUF_WRITABLE) < 0)
        return -1;
    if (capacity == 0 || (capacity & (capacity - 1)) || data_offset % 4096 ||
        (unsigned long long)m->buf.len != data_offset + capacity) {
        PyBuffer_Release(&m->buf);
        m->buf.obj = NULL;
        PyErr_SetString(PyExc_ValueError, "ring core: mapping size does not match the header");
        return -1;
    }
    m->mem = (char *)m->buf.buf;
    m->data = m->mem + data_offset;
    m->mask = capacity - 1;
    m->max_message = max_message;
    return 0;
}

static void mapping_detach(Mapping *m) {
    if (m->buf.obj != NULL) {
        PyBuffer_Release(&m->buf);
        m->buf.obj = NULL;
    }
    m->mem = m->data = NULL;
}

static int mapping_gone(Mapping *m) {
    if (m->mem != NULL)
        return 0;
    PyErr_SetString(PyExc_ValueError, "operation on a released ring mapping");
    return 1;
}

/* ---- what both types share: the object header and the mapping ------------------------------ */

typedef struct {
    PyObject_HEAD
    Mapping m;
} Core;   /* the first members of WriterCore and ReaderCore */

static int core_traverse(PyObject *self, visitproc visit, void *arg) {
    Py_VISIT(((Core *)self)->m.buf.obj);
    return 0;
}

static void core_dealloc(PyObject *self) {
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    mapping_detach(&((Core *)self)->m);
    tp->tp_free(self);
}

static PyObject *core_detach(PyObject *self, PyObject *unused) {
    mapping_detach(&((Core *)self)->m);
    Py_RETURN_NONE;
}

/* Bytes a frame with an ``n``-byte payload occupies (ring.frame_size). */
static inline uint64_t frame_size(uint64_t n) { return (n + HEADER + 15) & ~(uint64_t)15; }

/* ---- the writer ----------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    Mapping m;
    uint64_t cap;
    /* ring.RingWriter's state, shared with its Python slow paths as attributes */
    unsigned long long tail;    /* _tail: the committed tail */
    unsigned long long seq;     /* _seq: the next message's number */
    unsigned long long limit;   /* _limit: furthest end writable without making room */
} WriterCore;

static PyObject *writer_attach(WriterCore *w, PyObject *args) {
    PyObject *mm;
    unsigned long long data_offset, capacity, max_message;
    if (!PyArg_ParseTuple(args, "OKKK", &mm, &data_offset, &capacity, &max_message))
        return NULL;
    if (mapping_attach(&w->m, mm, data_offset, capacity, max_message) < 0)
        return NULL;
    w->cap = capacity;
    Py_RETURN_NONE;
}

/* The frame for an ``n``-byte payload at ``tail``, its header written (length, flags 0, ``seq``),
 * or NULL where the fast path must hand over with nothing stored: the frame would reach the wrap
 * point or ``limit`` (padding or room to make), it is too large, or the ring was retired (the
 * daemon deleted it or restarted: the Python path raises ChannelClosed). */
static inline char *writer_frame(WriterCore *w, uint64_t tail, uint64_t limit, Py_ssize_t n,
                                 uint64_t seq) {
    uint64_t size = frame_size((uint64_t)n);
    uint64_t off = tail & w->m.mask;
    if (n < 0 || off + size > w->cap || tail + size > limit || (uint64_t)n > w->m.max_message ||
        LOAD_RLX(w->m.mem + OFF_RETIRED))
        return NULL;
    char *frame = w->m.data + off;
    uint32_t hdr[2] = {(uint32_t)n, 0};
    memcpy(frame, hdr, 8);
    memcpy(frame + 8, &seq, 8);
    return frame;
}

/* After a commit: the wake-up handshake (ring.RingWriter._commit, "SYNC POINT (wake-up)").
 * Store tail (done by the caller), FENCE, load the waiting bytes; post sleepers through the
 * Python Wakeups object only when the word differs from the one last scanned. */
static int writer_after_commit(WriterCore *w) {
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint64_t waiting = LOAD_RLX(w->m.mem + OFF_WAITING);
    if (!waiting)
        return 0;
    PyObject *wakeups = PyObject_GetAttr((PyObject *)w, str_wakeups);
    if (wakeups == NULL)
        return -1;
    int must = waiting >= WIDE_BIT;
    if (!must) {
        PyObject *posted = PyObject_GetAttr(wakeups, str_posted_w0);
        if (posted == NULL) {
            Py_DECREF(wakeups);
            return -1;
        }
        unsigned long long p = PyLong_AsUnsignedLongLong(posted);
        Py_DECREF(posted);
        if (p == (unsigned long long)-1 && PyErr_Occurred()) {
            Py_DECREF(wakeups);
            return -1;
        }
        must = waiting != p;
    }
    if (must) {
        PyObject *r = PyObject_CallMethodNoArgs(wakeups, str_wake);
        Py_DECREF(wakeups);
        if (r == NULL)
            return -1;
        Py_DECREF(r);
        return 0;
    }
    Py_DECREF(wakeups);
    return 0;
}

/* Borrow the bytes of ``data`` without copying: bytes objects directly, anything else through
 * a C-contiguous buffer export (released by the caller when ``view->obj`` is set).  0: not one
 * contiguous run of bytes, the Python path decides what it is (and raises what it raises). */
static int borrow(PyObject *data, Py_buffer *view, const char **ptr, Py_ssize_t *n) {
    if (PyBytes_CheckExact(data)) {
        view->obj = NULL;
        *ptr = PyBytes_AS_STRING(data);
        *n = PyBytes_GET_SIZE(data);
        return 1;
    }
    if (PyObject_GetBuffer(data, view, PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Clear();
        view->obj = NULL;
        return 0;
    }
    *ptr = (const char *)view->buf;
    *n = view->len;
    return 1;
}

/* publish(data, timeout) -> seq: ring.RingWriter._publish_py's fast path, same stores. */
static PyObject *writer_publish(WriterCore *w, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "publish(data, timeout)");
        return NULL;
    }
    if (mapping_gone(&w->m))
        return NULL;
    Py_buffer view;
    const char *src;
    Py_ssize_t n;
    if (!borrow(args[0], &view, &src, &n))
        return PyObject_CallMethodObjArgs((PyObject *)w, str_publish_py, args[0], args[1], NULL);
    uint64_t tail = w->tail, seq = w->seq;
    char *frame = writer_frame(w, tail, w->limit, n, seq);
    if (frame == NULL) {   /* the Python path: padding, room to make, too large, retired */
        if (view.obj != NULL)
            PyBuffer_Release(&view);
        return PyObject_CallMethodObjArgs((PyObject *)w, str_publish_py, args[0], args[1], NULL);
    }
    memcpy(frame + HEADER, src, (size_t)n);
    if (view.obj != NULL)
        PyBuffer_Release(&view);
    /* SYNC POINT (complete frame): last = this frame, after every byte of it, before tail. */
    STORE_REL(w->m.mem + OFF_LAST, tail);
    uint64_t end = tail + frame_size((uint64_t)n);
    w->tail = end;
    w->seq = seq + 1;
    /* SYNC POINT (commit): the release store makes the frame visible with all its bytes. */
    STORE_REL(w->m.mem + OFF_TAIL, end);
    if (writer_after_commit(w) < 0)   /* SYNC POINT (wake-up fence) inside */
        return NULL;
    return PyLong_FromUnsignedLongLong(seq);
}

/* claim(n, timeout) -> memoryview: RingWriter._claim_py's fast path.  The frame's header is
 * written (nothing is visible: neither last nor tail moves); the view is a slice of the writer's
 * own ``_mv``, so it holds the mapping's export like the Python version's. */
static PyObject *writer_claim(WriterCore *w, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "claim(n, timeout)");
        return NULL;
    }
    if (mapping_gone(&w->m))
        return NULL;
    Py_ssize_t n = PyLong_AsSsize_t(args[0]);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    char *frame = writer_frame(w, w->tail, w->limit, n, w->seq);
    if (frame == NULL)
        return PyObject_CallMethodObjArgs((PyObject *)w, str_claim_py, args[0], args[1], NULL);
    Py_ssize_t at = (Py_ssize_t)(frame + HEADER - w->m.mem);
    PyObject *mv = PyObject_GetAttr((PyObject *)w, str_mv);
    if (mv == NULL)
        return NULL;
    PyObject *lo = PyLong_FromSsize_t(at), *hi = PyLong_FromSsize_t(at + n);
    PyObject *slice = (lo && hi) ? PySlice_New(lo, hi, NULL) : NULL;
    Py_XDECREF(lo);
    Py_XDECREF(hi);
    PyObject *view = slice ? PyObject_GetItem(mv, slice) : NULL;
    Py_XDECREF(slice);
    Py_DECREF(mv);
    return view;
}

/* commit_claim(n) -> seq: RingWriter._commit_claim_py (the frame claimed last, now complete). */
static PyObject *writer_commit_claim(WriterCore *w, PyObject *arg) {
    if (mapping_gone(&w->m))
        return NULL;
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    uint64_t tail = w->tail, seq = w->seq;
    uint64_t end = tail + frame_size((uint64_t)n);
    STORE_REL(w->m.mem + OFF_LAST, tail);   /* SYNC POINT (complete frame), as in publish */
    w->tail = end;
    w->seq = seq + 1;
    STORE_REL(w->m.mem + OFF_TAIL, end);    /* SYNC POINT (commit) */
    if (writer_after_commit(w) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(seq);
}

/* ring.RingWriter._commit_batch: last = old tail, tail, last = the final frame. */
static int writer_commit_batch(WriterCore *w, uint64_t last, uint64_t end, uint64_t seq) {
    uint64_t first = w->tail;
    STORE_REL(w->m.mem + OFF_LAST, first);    /* SYNC POINT (complete frame) */
    STORE_REL(w->m.mem + OFF_TAIL, end);      /* SYNC POINT (commit) */
    if (last != first)
        STORE_REL(w->m.mem + OFF_LAST, last); /* the final frame (<= tail now) */
    w->tail = end;
    w->seq = seq;
    return writer_after_commit(w);
}

/* publish_many(items, timeout) -> count: ring.RingWriter._publish_many_py for a list or tuple.
 * An item the fast path cannot take (wrap, room to make, too large, not plain bytes) commits
 * what is written, then goes through ``_publish_one_of_batch(item, timeout, index)`` on its own
 * (which names the index in any error), and the batch goes on here. */
static PyObject *writer_publish_many(WriterCore *w, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "publish_many(items, timeout)");
        return NULL;
    }
    PyObject *items = args[0];
    if (!PyList_CheckExact(items) && !PyTuple_CheckExact(items)) {
        /* an iterator is consumed lazily by the Python path, item by item */
        return PyObject_CallMethodObjArgs((PyObject *)w, str_publish_many_py, items, args[1],
                                          NULL);
    }
    if (mapping_gone(&w->m))
        return NULL;
    uint64_t tail = w->tail, seq = w->seq, limit = w->limit;
    int pending = 0;
    uint64_t last = 0;
    Py_ssize_t i;
    /* A list may change size while a slow path runs Python code: re-read the size each turn. */
    for (i = 0; i < PySequence_Fast_GET_SIZE(items); i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(items, i);
        Py_buffer view;
        const char *src;
        Py_ssize_t n;
        int ok = borrow(item, &view, &src, &n);
        char *frame = ok ? writer_frame(w, tail, limit, n, seq) : NULL;
        if (frame == NULL) {   /* padding, room to make, too large, retired, not plain bytes */
            if (ok && view.obj != NULL)
                PyBuffer_Release(&view);
            if (pending) {
                if (writer_commit_batch(w, last, tail, seq) < 0)
                    return NULL;
                pending = 0;
            }
            Py_INCREF(item);
            PyObject *index = PyLong_FromSsize_t(i);
            PyObject *r = index == NULL ? NULL : PyObject_CallMethodObjArgs(
                (PyObject *)w, str_publish_one_of_batch, item, args[1], index, NULL);
            Py_XDECREF(index);
            Py_DECREF(item);
            if (r == NULL)
                return NULL;
            Py_DECREF(r);
            if (mapping_gone(&w->m))
                return NULL;
            tail = w->tail;
            seq = w->seq;
            limit = w->limit;
            continue;
        }
        memcpy(frame + HEADER, src, (size_t)n);
        if (view.obj != NULL)
            PyBuffer_Release(&view);
        last = tail;
        pending = 1;
        tail += frame_size((uint64_t)n);
        seq += 1;
    }
    if (pending && writer_commit_batch(w, last, tail, seq) < 0)
        return NULL;
    return PyLong_FromSsize_t(i);
}

/* _walk_head(head, must, target, last) -> head: the frame walk of RingWriter._make_room.  It
 * stops where that loop breaks, or at the first frame that fails its validation, which the
 * Python loop then meets again (and raises for, naming what was wrong). */
static PyObject *writer_walk_head(WriterCore *w, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "_walk_head(head, must, target, last)");
        return NULL;
    }
    if (mapping_gone(&w->m))
        return NULL;
    uint64_t v[4];
    for (int i = 0; i < 4; i++) {
        v[i] = PyLong_AsUnsignedLongLong(args[i]);
        if (v[i] == (uint64_t)-1 && PyErr_Occurred())
            return NULL;
    }
    uint64_t head = v[0], must = v[1], target = v[2], last = v[3];
    while (head < must || head < target) {
        uint32_t hdr[2];
        memcpy(hdr, w->m.data + (head & w->m.mask), 8);
        uint64_t next = head + (((uint64_t)hdr[0] + HEADER + 15) & ~(uint64_t)15);
        if (hdr[1] > 1 || hdr[0] > w->m.max_message || next > last)
            break;   /* not a frame or PAD that ends by last: the Python loop raises */
        if (head >= must && next > target)
            break;
        head = next;
    }
    return PyLong_FromUnsignedLongLong(head);
}

static PyMemberDef writer_members[] = {
    {"_tail", T_ULONGLONG, offsetof(WriterCore, tail), 0, "the committed tail"},
    {"_seq", T_ULONGLONG, offsetof(WriterCore, seq), 0, "the next message's number"},
    {"_limit", T_ULONGLONG, offsetof(WriterCore, limit), 0, "furthest end writable as is"},
    {NULL}};

static PyMethodDef writer_methods[] = {
    {"_attach", (PyCFunction)writer_attach, METH_VARARGS,
     "_attach(mmap, data_offset, capacity, max_message): map the ring for the fast paths"},
    {"_detach", (PyCFunction)core_detach, METH_NOARGS, "release the mapping's buffer"},
    {"_walk_head", (PyCFunction)(void (*)(void))writer_walk_head, METH_FASTCALL,
     "_walk_head(head, must, target, last) -> head (RingWriter._make_room's frame walk)"},
    {"claim", (PyCFunction)(void (*)(void))writer_claim, METH_FASTCALL,
     "claim(n, timeout) -> memoryview (RingWriter._claim_py's common case in C)"},
    {"commit_claim", (PyCFunction)writer_commit_claim, METH_O,
     "commit_claim(n) -> seq (RingWriter._commit_claim_py in C)"},
    {"publish", (PyCFunction)(void (*)(void))writer_publish, METH_FASTCALL,
     "publish(data, timeout) -> seq (RingWriter._publish_py's common case in C)"},
    {"publish_many", (PyCFunction)(void (*)(void))writer_publish_many, METH_FASTCALL,
     "publish_many(items, timeout) -> count (RingWriter._publish_many_py's common case in C)"},
    {NULL}};

static PyTypeObject WriterCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shimmy._ringcore.WriterCore",
    .tp_basicsize = sizeof(WriterCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "C fast paths of ring.RingWriter (subclassed there)",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = core_dealloc,
    .tp_traverse = core_traverse,
    .tp_methods = writer_methods,
    .tp_members = writer_members,
};

/* ---- the reader ----------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    Mapping m;
    uint64_t pos_off;               /* byte offset of this subscriber's position word */
    int group;                      /* a group member: tail reloads go through Python */
    /* ring.RingReader's state, shared with its Python slow paths as attributes */
    unsigned long long position;    /* position: start of the next frame to read */
    unsigned long long tail;        /* _tail: the tail as last loaded */
    unsigned long long expect;      /* _expect: seq of the next frame */
} ReaderCore;

static PyObject *reader_attach(ReaderCore *r, PyObject *args) {
    PyObject *mm;
    unsigned long long data_offset, capacity, max_message, pos_off;
    int group;
    if (!PyArg_ParseTuple(args, "OKKKKp", &mm, &data_offset, &capacity, &max_message, &pos_off,
                          &group))
        return NULL;
    if (pos_off % 8 || pos_off + 8 > data_offset) {
        PyErr_SetString(PyExc_ValueError, "ring core: position word outside the slot table");
        return NULL;
    }
    if (mapping_attach(&r->m, mm, data_offset, capacity, max_message) < 0)
        return NULL;
    r->pos_off = pos_off;
    r->group = group;
    Py_RETURN_NONE;
}

/* Load the publisher's tail when the cursor reached the one cached: 1 more is committed, 0
 * caught up, -1 a tail that breaks the invariants (the Python path names it). */
static inline int reader_reload(ReaderCore *r, uint64_t p) {
    /* SYNC POINT (acquire): pairs with the publisher's release store of tail. */
    uint64_t t = LOAD_ACQ(r->m.mem + OFF_TAIL);
    if (t == p)
        return 0;
    if (t < p || (t & 15))
        return -1;
    r->tail = t;
    return 1;
}

/* The frame at ``p`` if it is a committed message with the expected seq whose header was intact
 * when read (``*length``, ``*seq`` set), or NULL where the Python path takes over: lapped, a PAD,
 * a frame failing validation, or lost messages (which the Python path counts). */
static inline char *reader_frame(ReaderCore *r, uint64_t p, uint64_t *length, uint64_t *seq) {
    char *frame = r->m.data + (p & r->m.mask);
    uint32_t hdr[2];
    memcpy(hdr, frame, 8);
    memcpy(seq, frame + 8, 8);
    /* SYNC POINT (validate header): head loaded after the header (acquire fence: the header
     * loads are not moved below it); head <= p: the header was intact. */
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    uint64_t head = LOAD_RLX(r->m.mem + OFF_HEAD);
    *length = hdr[0];
    if (head > p || hdr[1] != 0 || *length > r->m.max_message ||
        p + frame_size(*length) > r->tail || *seq != r->expect)
        return NULL;
    return frame;
}

/* One step of ring.RingReader._take_bytes_py.  1: ``*out`` is the next message (released);
 * 0: caught up (``*out`` NULL); -1: anything else, which the Python path handles (nothing
 * changed but the cached tail, which the Python path caches the same way); -2: an exception.
 * ``reload``: may load the publisher's tail when the cached one is reached. */
static int reader_step(ReaderCore *r, PyObject **out, int reload, int release) {
    char *mem = r->m.mem;
    for (;;) {
        uint64_t p = r->position;
        if (p == r->tail) {
            if (!reload)
                return -1;
            int more = reader_reload(r, p);
            if (more <= 0) {
                *out = NULL;
                return more;
            }
        }
        uint64_t length, seq;
        char *frame = reader_frame(r, p, &length, &seq);
        if (frame == NULL)
            return -1;
        uint64_t end = p + frame_size(length);
        PyObject *data = PyBytes_FromStringAndSize(frame + HEADER, (Py_ssize_t)length);
        if (data == NULL)
            return -2;
        /* SYNC POINT (validate payload): head loaded after the copy. */
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        if (LOAD_RLX(mem + OFF_HEAD) > p) {
            /* overwritten while copied: skipped, counted as lost by the next message */
            Py_DECREF(data);
            r->position = end;
            continue;
        }
        r->position = end;
        r->expect = seq + 1;
        if (release)   /* SYNC POINT (consumption): copied, the publisher may reuse it */
            STORE_REL(mem + r->pos_off, end);
        *out = data;
        return 1;
    }
}

/* take() -> (pos, payload_offset, length, seq, lost) | None: ring.RingReader._take_py's common
 * case (zero copy: the frame stays held until the next take or release_to). */
static PyObject *reader_take(ReaderCore *r, PyObject *unused) {
    if (mapping_gone(&r->m))
        return NULL;
    char *mem = r->m.mem;
    uint64_t p = r->position;
    STORE_REL(mem + r->pos_off, p);   /* SYNC POINT (consumption): the frame handed out last */
    if (p == r->tail) {
        if (r->group)
            goto slow;
        int more = reader_reload(r, p);
        if (more == 0)
            Py_RETURN_NONE;
        if (more < 0)
            goto slow;
    }
    uint64_t length, seq;
    char *frame = reader_frame(r, p, &length, &seq);
    if (frame == NULL)
        goto slow;
    r->position = p + frame_size(length);
    r->expect = seq + 1;
    return Py_BuildValue("(KnKKi)", (unsigned long long)p, (Py_ssize_t)(frame + HEADER - mem),
                         (unsigned long long)length, (unsigned long long)seq, 0);
slow:
    return PyObject_CallMethodNoArgs((PyObject *)r, str_take_py);
}

/* take_bytes() -> bytes | None (ring.RingReader._take_bytes_py's common case). */
static PyObject *reader_take_bytes(ReaderCore *r, PyObject *unused) {
    if (mapping_gone(&r->m))
        return NULL;
    PyObject *data;
    switch (reader_step(r, &data, !r->group, 1)) {
    case 1:
        return data;
    case 0:
        Py_RETURN_NONE;
    case -2:
        return NULL;
    default:
        return PyObject_CallMethodNoArgs((PyObject *)r, str_take_bytes_py);
    }
}

/* take_many_bytes(max_n) -> list | None (ring.RingReader._take_many_bytes_py): the messages
 * the fast path can copy, released with one store; where it meets a case it hands over (a PAD,
 * a lap, lost messages, a frame that fails validation), the Python twin goes on from there for
 * the rest of ``max_n``, so the result is the same as the Python version's. */
static PyObject *reader_take_many_bytes(ReaderCore *r, PyObject *arg) {
    if (mapping_gone(&r->m))
        return NULL;
    Py_ssize_t max_n = PyLong_AsSsize_t(arg);
    if (max_n == -1 && PyErr_Occurred())
        return NULL;
    PyObject *out = NULL;
    Py_ssize_t n = 0;
    int rc = 0;
    while (n < max_n) {
        PyObject *data;
        rc = reader_step(r, &data, 1, 0);
        if (rc != 1)
            break;
        if (out == NULL && (out = PyList_New(0)) == NULL) {
            Py_DECREF(data);
            rc = -2;
            break;
        }
        int e = PyList_Append(out, data);
        Py_DECREF(data);
        if (e < 0) {
            rc = -2;
            break;
        }
        n++;
    }
    /* SYNC POINT (consumption): everything before position was copied (or skipped). */
    STORE_REL(r->m.mem + r->pos_off, r->position);
    if (rc == -2) {
        Py_XDECREF(out);
        return NULL;
    }
    if (rc == -1) {
        if (out == NULL)
            return PyObject_CallMethodOneArg((PyObject *)r, str_take_many_bytes_py, arg);
        /* The twin appends to the messages copied so far and returns them (also when it meets
         * a frame that fails validation: they are delivered, the next call raises). */
        PyObject *more = PyObject_CallMethodObjArgs((PyObject *)r, str_take_many_bytes_py, arg,
                                                    out, NULL);
        Py_DECREF(out);
        return more;
    }
    if (out != NULL)
        return out;
    Py_RETURN_NONE;
}

static PyMemberDef reader_members[] = {
    {"position", T_ULONGLONG, offsetof(ReaderCore, position), 0, "start of the next frame"},
    {"_tail", T_ULONGLONG, offsetof(ReaderCore, tail), 0, "the tail as last loaded"},
    {"_expect", T_ULONGLONG, offsetof(ReaderCore, expect), 0, "seq of the next frame"},
    {NULL}};

static PyMethodDef reader_methods[] = {
    {"_attach", (PyCFunction)reader_attach, METH_VARARGS,
     "_attach(mmap, data_offset, capacity, max_message, position_offset, group)"},
    {"_detach", (PyCFunction)core_detach, METH_NOARGS, "release the mapping's buffer"},
    {"take", (PyCFunction)reader_take, METH_NOARGS,
     "take() -> (pos, payload_offset, length, seq, lost) | None (RingReader._take_py in C)"},
    {"take_bytes", (PyCFunction)reader_take_bytes, METH_NOARGS,
     "take_bytes() -> bytes | None (RingReader._take_bytes_py's common case in C)"},
    {"take_many_bytes", (PyCFunction)reader_take_many_bytes, METH_O,
     "take_many_bytes(max_n) -> list | None (RingReader._take_many_bytes_py's common case)"},
    {NULL}};

static PyTypeObject ReaderCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shimmy._ringcore.ReaderCore",
    .tp_basicsize = sizeof(ReaderCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "C fast paths of ring.RingReader (subclassed there)",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = core_dealloc,
    .tp_traverse = core_traverse,
    .tp_methods = reader_methods,
    .tp_members = reader_members,
};

/* ---- module --------------------------------------------------------------------------------- */

static struct PyModuleDef ringcore_module = {
    PyModuleDef_HEAD_INIT, "shimmy._ringcore",
    "C fast paths of the pub/sub ring (see shimmy/ring.py and docs/ring-format.md).", -1, NULL};

PyMODINIT_FUNC PyInit__ringcore(void) {
    if (PyType_Ready(&WriterCoreType) < 0 || PyType_Ready(&ReaderCoreType) < 0)
        return NULL;
#define INTERN(var, s) if ((var = PyUnicode_InternFromString(s)) == NULL) return NULL
    INTERN(str_publish_py, "_publish_py");
    INTERN(str_publish_many_py, "_publish_many_py");
    INTERN(str_claim_py, "_claim_py");
    INTERN(str_mv, "_mv");
    INTERN(str_take_py, "_take_py");
    INTERN(str_publish_one_of_batch, "_publish_one_of_batch");
    INTERN(str_take_bytes_py, "_take_bytes_py");
    INTERN(str_take_many_bytes_py, "_take_many_bytes_py");
    INTERN(str_wakeups, "_wakeups");
    INTERN(str_posted_w0, "posted_w0");
    INTERN(str_wake, "wake");
#undef INTERN
    PyObject *m = PyModule_Create(&ringcore_module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddIntConstant(m, "OFF_TAIL", OFF_TAIL) < 0 ||
        PyModule_AddIntConstant(m, "OFF_HEAD", OFF_HEAD) < 0 ||
        PyModule_AddIntConstant(m, "OFF_LAST", OFF_LAST) < 0 ||
        PyModule_AddIntConstant(m, "OFF_WAITING", OFF_WAITING) < 0 ||
        PyModule_AddIntConstant(m, "HEADER", HEADER) < 0)
        goto fail;
    Py_INCREF(&WriterCoreType);
    if (PyModule_AddObject(m, "WriterCore", (PyObject *)&WriterCoreType) < 0) {
        Py_DECREF(&WriterCoreType);
        goto fail;
    }
    Py_INCREF(&ReaderCoreType);
    if (PyModule_AddObject(m, "ReaderCore", (PyObject *)&ReaderCoreType) < 0) {
        Py_DECREF(&ReaderCoreType);
        goto fail;
    }
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
