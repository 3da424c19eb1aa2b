/* The per-message paths of the pub/sub ring in C (shimmy/ring/, spec/ring.md).
 *
 * ring.RingWriter and ring.RingReader (shimmy/ring/writer.py, reader.py) subclass the two types
 * below.  Each method here runs the common case of its Python twin with the same loads and
 * stores in the same order; the seven twins are ``publish`` (``_publish_py``), ``publish_many``
 * (``_publish_many_py``), ``claim`` (``_claim_py``), ``commit_claim`` (``_commit_claim_py``),
 * ``take`` (``_take_py``), ``take_bytes`` (``_take_bytes_py``) and ``take_many_bytes``
 * (``_take_many_bytes_py``), plus ``_walk_head``, the frame walk of RingWriter._make_room.  Each
 * hands every other case (wrap padding, room to make, a lapped or lossy reader, a frame that
 * fails validation, a bytes-like object that is not one contiguous run of bytes) to that Python
 * twin, before changing any state.  The Python twins stay the reference: they run alone where
 * this module is not built, or with SHIMMY_PURE_PYTHON=1, and the tests run both ways.  (The
 * byte stream's two paths, further down, have their own twins in shimmy/stream_ring.py.)
 *
 * What this module and Python must agree on is checked when the package imports it
 * (shimmy/ring/native.py): every offset #define below is exported and compared with the Python
 * layout, and every Python attribute looked up here by name (the INTERN list in PyInit__ringcore,
 * exported as LOOKUPS) must exist on its class; either mismatch refuses the module.
 *
 * Memory ordering.  The Python paths rely on x86-64 TSO and on aligned 8-byte stores through a
 * memoryview being single `mov`s.  Here the same order is stated to the compiler as well:
 * the commit words are stored with release semantics (every earlier store, the frame bytes,
 * is visible first), the tail is loaded with acquire semantics (no later load, the frame bytes,
 * is hoisted above it), an acquire fence keeps the frame loads before the overwrite guard's
 * load of head, and the wake-up handshake uses a full (sequentially consistent) fence between
 * the tail store and the load of the waiting bytes, as ring.fence() does.  After each store of
 * its position a reader loads the publisher's room_wait word, with no fence (spec/ring.md,
 * "Waiting for room", argues why), and posts the ring's room semaphore when it reached it.
 */
#include "_ringcore.h"

#include <semaphore.h>

static PyObject *str_readinto_fast_py, *str_write_py, *str_peer, *str_release, *str_publish_many_py, *str_claim_py, *str_mv, *str_take_py, *str_publish_py, *str_publish_one_of_batch, *str_take_bytes_py,
    *str_take_many_bytes_py, *str_wakeups, *str_posted_w0, *str_wake;

/* ---- the writer ----------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    Mapping m;
    uint64_t cap;
    /* ring.RingWriter's state, shared with its Python slow paths as attributes */
    unsigned long long tail;    /* _tail: the committed tail */
    unsigned long long seq;     /* _seq: the next message's number */
    unsigned long long limit;   /* _limit: furthest end writable without making room */
    unsigned long long head;    /* _head: the head as last stored */
    int reliable;               /* the ring's mode is reliable (header word, fixed) */
    uint32_t max_subs;          /* the slot table's size (header word, fixed) */
    char rewind;                /* rewind: the publisher chose rewinds (spec/ring.md, "Rewind") */
} WriterCore;

static PyObject *writer_attach(WriterCore *w, PyObject *args) {
    PyObject *mm;
    unsigned long long data_offset, capacity, max_message;
    if (!PyArg_ParseTuple(args, "OKKK", &mm, &data_offset, &capacity, &max_message))
        return NULL;
    if (mapping_attach(&w->m, mm, data_offset, capacity, max_message) < 0)
        return NULL;
    w->cap = capacity;
    w->reliable = LOAD32(w->m.mem + OFF_MODE) == MODE_RELIABLE;
    w->max_subs = LOAD32(w->m.mem + OFF_MAX_SUBS);
    if (CONTROL_SIZE + (unsigned long long)w->max_subs * SLOT_SIZE > data_offset) {
        mapping_detach(&w->m);
        PyErr_SetString(PyExc_ValueError, "ring core: slot table overlaps the frame area");
        return NULL;
    }
    Py_RETURN_NONE;
}

/* The frame walk of RingWriter._make_room from ``head``: past every frame that ends by ``last``
 * until ``must`` is reached and the next frame would pass ``target``.  ``*bad`` is set where it
 * stopped at a frame failing its validation (the Python loop meets it again and raises). */
static uint64_t walk_head(WriterCore *w, uint64_t head, uint64_t must, uint64_t target,
                          uint64_t last, int *bad) {
    *bad = 0;
    while (head < must || head < target) {
        uint32_t hdr[2];
        memcpy(hdr, w->m.data + (head & w->m.mask), 8);
        uint64_t next = head + (((uint64_t)hdr[0] + HEADER + 15) & ~(uint64_t)15);
        /* a message is at most max_message; a PAD (16-aligned) may reach back to a rewind */
        if (hdr[1] > 1 || (hdr[1] == 0 ? hdr[0] > w->m.max_message : (hdr[0] & 15) != 0) ||
            next > last) {
            *bad = 1;   /* not a frame or PAD that ends by last */
            break;
        }
        if (head >= must && next > target)
            break;
        head = next;
    }
    return head;
}

/* RingWriter._make_room's common case for a frame ending at ``end`` at the committed tail: the
 * ring is lossy, or reliable and every ACTIVE subscriber has consumed past ``end - capacity``
 * already (no wait), and the head walk meets only valid frames.  The same loads, the same head
 * and the same store as the Python version.  1: head stored and the limit moved; 0: nothing
 * stored, the Python path takes over (it waits for room, or raises naming what was wrong).
 * Runs once per frame at 1 MiB in a 16 MiB ring, where the Python version cost ~10 us. */
static int writer_room(WriterCore *w, uint64_t end) {
    char *mem = w->m.mem;
    uint64_t cap = w->cap, tail = w->tail, floor = end;
    if (w->reliable) {   /* min_position: the slowest ACTIVE subscriber, or tail */
        uint32_t high = LOAD32(mem + OFF_SLOT_HIGH);
        if (high > w->max_subs)
            return 0;
        floor = tail;
        for (uint32_t s = 0; s < high; s++) {
            char *slot = mem + CONTROL_SIZE + (uint64_t)s * SLOT_SIZE;
            if (LOAD32(slot + SLOT_OFF_STATE) != SLOT_ACTIVE)
                continue;
            /* SYNC POINT (consumption, acquire): pairs with the subscriber's release store of
             * its position; the frames it passed are overwritten only after this load. */
            uint64_t p = LOAD_ACQ(slot);
            if (p > tail)
                return 0;
            if (p < floor)
                floor = p;
        }
        if (end - floor > cap)
            return 0;
    }
    uint64_t last = LOAD_RLX(mem + OFF_LAST);   /* our own word */
    uint64_t must = end - cap, target = end - cap + (cap >> 4);
    if (target > floor)
        target = floor;
    if (target > last)
        target = last;
    int bad;
    uint64_t head = walk_head(w, w->head, must, target, last, &bad);
    if (bad)
        return 0;
    w->head = head;
    /* SYNC POINT (overwrite guard): head stored before any byte of the frames it passes is
     * overwritten; the release fence keeps the later frame stores below this store. */
    __atomic_store_n((uint64_t *)(mem + OFF_HEAD), head, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    w->limit = head + cap;
    return 1;
}

/* RingWriter._may_rewind: whether a frame of ``size`` bytes may start the next lap now (a PAD
 * to the wrap point first): no peer mirrors the ring (its stream word is 0) and every ACTIVE
 * subscriber has consumed the frame at ``last``'s predecessors and the first ``size`` bytes of
 * this lap (spec/ring.md, "Rewind").  Loads only: deciding not to rewind changes nothing. */
static int writer_may_rewind(WriterCore *w, uint64_t size) {
    char *mem = w->m.mem;
    if (LOAD_RLX(mem + OFF_STREAM))
        return 0;
    uint64_t need = (w->tail & ~w->m.mask) + size, last = LOAD_RLX(mem + OFF_LAST);
    if (need < last)
        need = last;
    uint32_t high = LOAD32(mem + OFF_SLOT_HIGH);
    if (high > w->max_subs)
        return 0;
    for (uint32_t s = 0; s < high; s++) {
        char *slot = mem + CONTROL_SIZE + (uint64_t)s * SLOT_SIZE;
        if (LOAD32(slot + SLOT_OFF_STATE) == SLOT_ACTIVE && LOAD_ACQ(slot) < need)
            return 0;
    }
    return 1;
}

/* RingWriter._reserve's common cases for one frame of ``n`` bytes at the committed tail that
 * does not fit as is: at the wrap point, a PAD to the end of the ring committed on its own (room
 * made for it first), then room made for the frame, with the same stores in the same order.
 * Whatever it cannot do here it leaves undone, with the ring in a state the Python path goes on
 * from (the PAD committed or not): writer_frame then hands over. */
static void writer_reserve(WriterCore *w, Py_ssize_t n) {
    if (n < 0 || (uint64_t)n > w->m.max_message || LOAD_RLX(w->m.mem + OFF_RETIRED))
        return;   /* the Python path raises */
    uint64_t size = frame_size((uint64_t)n), tail = w->tail, off = tail & w->m.mask;
    uint64_t rest = w->cap - off;
    if (size > rest ||
        (w->rewind && size >= REWIND_MIN_FRAME && size <= off && writer_may_rewind(w, size))) {
        if (tail + rest > w->limit && !writer_room(w, tail + rest))
            return;
        /* The PAD carries the seq of the message before it (stream_point reads it). */
        uint32_t hdr[2] = {(uint32_t)(rest - HEADER), FLAG_PAD};
        uint64_t prev = w->seq - 1;
        memcpy(w->m.data + off, hdr, 8);
        memcpy(w->m.data + off + 8, &prev, 8);
        STORE_REL(w->m.mem + OFF_LAST, tail);   /* SYNC POINT (complete frame) */
        tail += rest;
        w->tail = tail;
        STORE_REL(w->m.mem + OFF_TAIL, tail);   /* SYNC POINT (commit of the PAD alone) */
    }
    if (tail + size > w->limit)
        writer_room(w, tail + size);
}

/* Whether a frame of ``n`` bytes fits at the committed tail as is and is no candidate for a
 * rewind (else writer_reserve decides). */
static inline int writer_fits(WriterCore *w, Py_ssize_t n) {
    uint64_t size = frame_size((uint64_t)n), off = w->tail & w->m.mask;
    return off + size <= w->cap && w->tail + size <= w->limit &&
           (!w->rewind || size < REWIND_MIN_FRAME || size > off);
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

/* After a commit: the wake-up handshake (ring.RingWriter._commit, "SYNC POINT (wake-up)"),
 * the tail stored by the caller. */
static int writer_after_commit(WriterCore *w) {
    return wake_after_commit((PyObject *)w, w->m.mem, str_wakeups, str_posted_w0, str_wake);
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
    if (!writer_fits(w, n))
        writer_reserve(w, n);
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
    if (!writer_fits(w, n))
        writer_reserve(w, n);
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
    int bad;
    return PyLong_FromUnsignedLongLong(walk_head(w, v[0], v[1], v[2], v[3], &bad));
}

static PyMemberDef writer_members[] = {
    {"_tail", T_ULONGLONG, offsetof(WriterCore, tail), 0, "the committed tail"},
    {"_seq", T_ULONGLONG, offsetof(WriterCore, seq), 0, "the next message's number"},
    {"_limit", T_ULONGLONG, offsetof(WriterCore, limit), 0, "furthest end writable as is"},
    {"_head", T_ULONGLONG, offsetof(WriterCore, head), 0, "the head as last stored"},
    {"rewind", T_BOOL, offsetof(WriterCore, rewind), 0, "large frames may rewind"},
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
    char room_name[256];            /* the ring's room semaphore ("": none to post) */
    sem_t *room;                    /* opened at the first post (NULL: not yet) */
    unsigned long long room_posted; /* _room_posted: the room_wait value posted last */
    /* ring.RingReader's state, shared with its Python slow paths as attributes */
    unsigned long long position;    /* position: start of the next frame to read */
    unsigned long long tail;        /* _tail: the tail as last loaded */
    unsigned long long expect;      /* _expect: seq of the next frame */
    unsigned long long padded;      /* padded: bytes of PADs skipped (RingReader._pad_end) */
} ReaderCore;

static PyObject *reader_attach(ReaderCore *r, PyObject *args) {
    PyObject *mm;
    unsigned long long data_offset, capacity, max_message, pos_off;
    int group;
    const char *room = NULL;
    if (!PyArg_ParseTuple(args, "OKKKKpz", &mm, &data_offset, &capacity, &max_message, &pos_off,
                          &group, &room))
        return NULL;
    if (pos_off % 8 || pos_off + 8 > data_offset) {
        PyErr_SetString(PyExc_ValueError, "ring core: position word outside the slot table");
        return NULL;
    }
    if (room != NULL && strlen(room) >= sizeof r->room_name) {
        PyErr_SetString(PyExc_ValueError, "ring core: room semaphore name too long");
        return NULL;
    }
    strcpy(r->room_name, room != NULL ? room : "");
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

/* After every store of this subscriber's position ``pos``: the consumer side of the wait for
 * room (ring.RingReader._room_reached; spec/ring.md, "Waiting for room").  One relaxed load of
 * a word on the publisher's line, which the take paths load anyway (tail); no fence, by design
 * (the spec argues why a post this misses costs the publisher at most its bounded sleep).  The
 * post is sem_post on the ring's room semaphore, opened here at the first post; one that cannot
 * be opened (gone with its channel, a daemon that made none) is never tried again. */
static void reader_room_post(ReaderCore *r, uint64_t need) {
    r->room_posted = need;
    if (r->room == NULL) {
        if (!r->room_name[0])
            return;
        sem_t *sem = sem_open(r->room_name, 0);
        if (sem == SEM_FAILED) {
            r->room_name[0] = 0;
            return;
        }
        r->room = sem;
    }
    sem_post(r->room);   /* EOVERFLOW at SEM_VALUE_MAX: the publisher has posts enough */
}

static inline void reader_room(ReaderCore *r, uint64_t pos) {
    uint64_t need = LOAD_RLX(r->m.mem + OFF_ROOM_WAIT);   /* SYNC POINT (room wait) */
    if (__builtin_expect(need != 0, 0) && need <= pos && need != r->room_posted)
        reader_room_post(r, need);
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

/* The end of the PAD at ``p`` when it is one, intact when read (head <= p) and committed
 * (ring.RingReader._pad_end); 0 where the Python path takes over (a lap, a bad header).  Once
 * per lap, or per message where the publisher rewinds (spec/ring.md, "Rewind"). */
static inline uint64_t reader_pad(ReaderCore *r, uint64_t p) {
    uint32_t hdr[2];
    memcpy(hdr, r->m.data + (p & r->m.mask), 8);
    /* SYNC POINT (validate header), as in reader_frame */
    __atomic_thread_fence(__ATOMIC_ACQUIRE);
    if (LOAD_RLX(r->m.mem + OFF_HEAD) > p || hdr[1] != FLAG_PAD || (hdr[0] & 15) ||
        p + hdr[0] + HEADER > r->tail)
        return 0;
    return p + hdr[0] + HEADER;
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
        if (frame == NULL) {
            uint64_t pad = reader_pad(r, p);
            if (!pad)
                return -1;
            r->padded += pad - p;
            r->position = pad;
            if (release) {   /* SYNC POINT (consumption), as _take_bytes_py: a PAD is released */
                STORE_REL(mem + r->pos_off, pad);
                reader_room(r, pad);
            }
            continue;
        }
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
        if (release) {   /* SYNC POINT (consumption): copied, the publisher may reuse it */
            STORE_REL(mem + r->pos_off, end);
            reader_room(r, end);
        }
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
    reader_room(r, p);
    uint64_t length, seq;
    char *frame;
    for (;;) {
        if (p == r->tail) {
            if (r->group)
                goto slow;
            int more = reader_reload(r, p);
            if (more == 0)
                Py_RETURN_NONE;
            if (more < 0)
                goto slow;
        }
        frame = reader_frame(r, p, &length, &seq);
        if (frame != NULL)
            break;
        uint64_t pad = reader_pad(r, p);
        if (!pad)
            goto slow;
        r->padded += pad - p;
        r->position = p = pad;
        /* SYNC POINT (consumption), as _take_py: the PAD is released before the frame after it
         * is handed out, so a held view pins its frame only, not a lap of PAD behind it. */
        STORE_REL(mem + r->pos_off, p);
        reader_room(r, p);
    }
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
    reader_room(r, r->position);
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

static void reader_dealloc(PyObject *self) {
    ReaderCore *r = (ReaderCore *)self;
    if (r->room != NULL) {
        sem_close(r->room);
        r->room = NULL;
    }
    core_dealloc(self);
}

static PyMemberDef reader_members[] = {
    {"position", T_ULONGLONG, offsetof(ReaderCore, position), 0, "start of the next frame"},
    {"_tail", T_ULONGLONG, offsetof(ReaderCore, tail), 0, "the tail as last loaded"},
    {"_expect", T_ULONGLONG, offsetof(ReaderCore, expect), 0, "seq of the next frame"},
    {"padded", T_ULONGLONG, offsetof(ReaderCore, padded), 0, "bytes of PADs skipped"},
    {"_room_posted", T_ULONGLONG, offsetof(ReaderCore, room_posted), 0,
     "the room_wait value posted last"},
    {NULL}};

static PyMethodDef reader_methods[] = {
    {"_attach", (PyCFunction)reader_attach, METH_VARARGS,
     "_attach(mmap, data_offset, capacity, max_message, position_offset, group, room)"},
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
    .tp_dealloc = reader_dealloc,
    .tp_traverse = core_traverse,
    .tp_methods = reader_methods,
    .tp_members = reader_members,
};

/* ---- the byte stream (shimmy/stream_ring.py) ------------------------------------------------
 *
 * stream_ring.WriterCursor and ReaderCursor subclass the two types below: ``write`` and
 * ``readinto_fast`` run the common case of their Python twins (``_write_py``,
 * ``_readinto_fast_py``: the whole write fits at once, or bytes are buffered and do not wrap)
 * with the same loads and stores in the same order, and hand everything else to them before
 * changing anything but the cached head or tail (which the Python twins cache the same way).
 * A chunk of 4 KiB cost ~1 us of interpreter per end in Python, more than a pipe's syscall. */

#define S_OFF_RETIRED 40
#define S_OFF_TAIL 320
#define S_OFF_W_WAITING 336
#define S_OFF_HEAD 384
#define S_OFF_R_CLOSED 392
#define S_OFF_R_WAITING 400
#define S_OFF_R_BROKEN 456

typedef struct {
    PyObject_HEAD
    Mapping m;
    uint64_t cap;
    /* the cursor's state, shared with its Python paths as attributes */
    unsigned long long head;    /* _head: the head as last loaded (writer) or stored (reader) */
    unsigned long long tail;    /* _tail: the tail as last stored (writer) or loaded (reader) */
    unsigned long long posted;  /* _posted: the peer's sleep epoch posted last */
    unsigned long long piece;   /* _piece: the writer commits at least this often */
} StreamCore;

static PyObject *stream_attach(StreamCore *c, PyObject *args) {
    PyObject *mm;
    unsigned long long data_offset, capacity;
    if (!PyArg_ParseTuple(args, "OKK", &mm, &data_offset, &capacity))
        return NULL;
    if (mapping_attach(&c->m, mm, data_offset, capacity, 0) < 0)
        return NULL;
    c->cap = capacity;
    Py_RETURN_NONE;
}

/* After storing our commit word (tail or head): the waker side of the Dekker pair, as
 * stream_ring._End._post_peer_if_waiting: FENCE, load the peer's waiting word, post its
 * semaphore once per epoch. */
static int stream_post_peer(StreamCore *c, uint64_t waiting_off) {
    __atomic_thread_fence(__ATOMIC_SEQ_CST);   /* SYNC POINT (Dekker, waker side) */
    uint64_t w = LOAD_RLX(c->m.mem + waiting_off);
    if (!w || w == c->posted)
        return 0;
    c->posted = w;
    PyObject *peer = PyObject_GetAttr((PyObject *)c, str_peer);
    if (peer == NULL)
        return -1;
    PyObject *r = PyObject_CallMethodNoArgs(peer, str_release);
    Py_DECREF(peer);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* write(data, timeout) -> n: WriterCursor._write_py's fast path (the reader is there, the whole
 * of ``data`` fits now and in one piece). */
static PyObject *stream_write(StreamCore *c, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "write(data, timeout)");
        return NULL;
    }
    if (mapping_gone(&c->m))
        return NULL;
    Py_buffer view;
    const char *src;
    Py_ssize_t n;
    if (!borrow(args[0], &view, &src, &n))
        goto slow;
    char *mem = c->m.mem;
    if (LOAD_RLX(mem + S_OFF_R_CLOSED) || LOAD_RLX(mem + S_OFF_R_BROKEN) ||
        LOAD_RLX(mem + S_OFF_RETIRED))
        goto slow_release;
    uint64_t cap = c->cap, tail = c->tail;
    if (cap - (tail - c->head) < (uint64_t)n) {
        /* SYNC POINT (acquire head): pairs with the reader's head store. */
        uint64_t head = LOAD_ACQ(mem + S_OFF_HEAD);
        if (tail - head > cap)
            goto slow_release;   /* the Python path validates it and raises */
        c->head = head;
    }
    if ((uint64_t)n > cap - (tail - c->head) || (uint64_t)n > c->piece)
        goto slow_release;
    uint64_t off = tail & c->m.mask;
    if (off + (uint64_t)n <= cap) {
        memcpy(c->m.data + off, src, (size_t)n);
    } else {   /* the write wraps: split it at the end of the data area */
        uint64_t first = cap - off;
        memcpy(c->m.data + off, src, (size_t)first);
        memcpy(c->m.data, src + first, (size_t)((uint64_t)n - first));
    }
    if (view.obj != NULL)
        PyBuffer_Release(&view);
    tail += (uint64_t)n;
    c->tail = tail;
    STORE_REL(mem + S_OFF_TAIL, tail);   /* SYNC POINT (commit) */
    if (stream_post_peer(c, S_OFF_R_WAITING) < 0)
        return NULL;
    return PyLong_FromSsize_t(n);
slow_release:
    if (view.obj != NULL)
        PyBuffer_Release(&view);
slow:
    return PyObject_CallMethodObjArgs((PyObject *)c, str_write_py, args[0], args[1], NULL);
}

/* readinto_fast(buf, timeout) -> n: ReaderCursor._readinto_fast_py's fast path (bytes are
 * buffered and the copy does not wrap). */
static PyObject *stream_readinto(StreamCore *c, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "readinto_fast(buf, timeout)");
        return NULL;
    }
    if (mapping_gone(&c->m))
        return NULL;
    char *mem = c->m.mem;
    uint64_t cap = c->cap, head = c->head, avail = c->tail - head;
    if (!avail) {
        /* SYNC POINT (acquire tail): pairs with the writer's tail store. */
        uint64_t tail = LOAD_ACQ(mem + S_OFF_TAIL);
        if (tail - head > cap)
            goto slow;   /* the Python path validates it and raises */
        c->tail = tail;
        avail = tail - head;
        if (!avail)
            goto slow;   /* nothing buffered: the Python path waits */
    }
    Py_buffer view;
    if (PyObject_GetBuffer(args[0], &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Clear();
        goto slow;
    }
    uint64_t k = (uint64_t)view.len, off = head & c->m.mask;
    if (avail < k)
        k = avail;
    if (k == 0 || off + k > cap) {
        PyBuffer_Release(&view);
        goto slow;
    }
    memcpy(view.buf, c->m.data + off, (size_t)k);
    PyBuffer_Release(&view);
    head += k;
    c->head = head;
    STORE_REL(mem + S_OFF_HEAD, head);   /* SYNC POINT (release): copied out, the writer may reuse */
    if (stream_post_peer(c, S_OFF_W_WAITING) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(k);
slow:
    return PyObject_CallMethodObjArgs((PyObject *)c, str_readinto_fast_py, args[0], args[1], NULL);
}

static PyMemberDef stream_members[] = {
    {"_head", T_ULONGLONG, offsetof(StreamCore, head), 0, "head as last loaded or stored"},
    {"_tail", T_ULONGLONG, offsetof(StreamCore, tail), 0, "tail as last stored or loaded"},
    {"_posted", T_ULONGLONG, offsetof(StreamCore, posted), 0, "the peer's epoch posted last"},
    {"_piece", T_ULONGLONG, offsetof(StreamCore, piece), 0, "commit at least this often"},
    {NULL}};

static PyMethodDef stream_writer_methods[] = {
    {"_attach", (PyCFunction)stream_attach, METH_VARARGS,
     "_attach(mmap, data_offset, capacity): map the stream for the fast paths"},
    {"_detach", (PyCFunction)core_detach, METH_NOARGS, "release the mapping's buffer"},
    {"write", (PyCFunction)(void (*)(void))stream_write, METH_FASTCALL,
     "write(data, timeout) -> n (WriterCursor._write_py's common case in C)"},
    {NULL}};

static PyMethodDef stream_reader_methods[] = {
    {"_attach", (PyCFunction)stream_attach, METH_VARARGS,
     "_attach(mmap, data_offset, capacity): map the stream for the fast paths"},
    {"_detach", (PyCFunction)core_detach, METH_NOARGS, "release the mapping's buffer"},
    {"readinto_fast", (PyCFunction)(void (*)(void))stream_readinto, METH_FASTCALL,
     "readinto_fast(buf, timeout) -> n (ReaderCursor._readinto_fast_py's common case in C)"},
    {NULL}};

static PyTypeObject StreamWriterCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shimmy._ringcore.StreamWriterCore",
    .tp_basicsize = sizeof(StreamCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "C fast path of stream_ring.WriterCursor (subclassed there)",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = core_dealloc,
    .tp_traverse = core_traverse,
    .tp_methods = stream_writer_methods,
    .tp_members = stream_members,
};

static PyTypeObject StreamReaderCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shimmy._ringcore.StreamReaderCore",
    .tp_basicsize = sizeof(StreamCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "C fast path of stream_ring.ReaderCursor (subclassed there)",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = core_dealloc,
    .tp_traverse = core_traverse,
    .tp_methods = stream_reader_methods,
    .tp_members = stream_members,
};

/* ---- module --------------------------------------------------------------------------------- */

static struct PyModuleDef ringcore_module = {
    PyModuleDef_HEAD_INIT, "shimmy._ringcore",
    "C fast paths of the pub/sub ring (see shimmy/ring/ and spec/ring.md).", -1, NULL};

PyMODINIT_FUNC PyInit__ringcore(void) {
    if (PyType_Ready(&WriterCoreType) < 0 || PyType_Ready(&ReaderCoreType) < 0 ||
        PyType_Ready(&StreamWriterCoreType) < 0 || PyType_Ready(&StreamReaderCoreType) < 0)
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
    INTERN(str_readinto_fast_py, "_readinto_fast_py");
    INTERN(str_write_py, "_write_py");
    INTERN(str_peer, "_peer");
    INTERN(str_release, "release");
#undef INTERN
    PyObject *m = PyModule_Create(&ringcore_module);
    if (m == NULL)
        return NULL;
    /* Every layout constant above, for shimmy/ring/native.py's check_layout (ring words) and
     * stream_ring's (the S_ stream words): the package refuses this module at import when one
     * differs from the Python layout. */
#define EXPORT(name) PyModule_AddIntConstant(m, #name, name) < 0
    if (EXPORT(OFF_MODE) || EXPORT(OFF_MAX_SUBS) || EXPORT(OFF_RETIRED) || EXPORT(OFF_TAIL) ||
        EXPORT(OFF_HEAD) || EXPORT(OFF_LAST) || EXPORT(OFF_ROOM_WAIT) || EXPORT(OFF_SLOT_HIGH) ||
        EXPORT(OFF_WAITING) ||
        EXPORT(CONTROL_SIZE) || EXPORT(SLOT_SIZE) || EXPORT(SLOT_OFF_STATE) ||
        EXPORT(SLOT_ACTIVE) || EXPORT(MODE_RELIABLE) || EXPORT(HEADER) || EXPORT(FLAG_PAD) ||
        EXPORT(OFF_STREAM) || EXPORT(REWIND_MIN_FRAME) ||
        EXPORT(S_OFF_RETIRED) || EXPORT(S_OFF_TAIL) || EXPORT(S_OFF_W_WAITING) ||
        EXPORT(S_OFF_HEAD) || EXPORT(S_OFF_R_CLOSED) || EXPORT(S_OFF_R_WAITING) ||
        EXPORT(S_OFF_R_BROKEN) ||
        PyModule_AddObject(m, "WIDE_BIT", PyLong_FromUnsignedLongLong(WIDE_BIT)) < 0)
        goto fail;
#undef EXPORT
    /* The Python attributes each type looks up by name (the INTERN list above, by the object it
     * is looked up on): the package checks at import that each exists, so a rename on the
     * Python side fails there, not at the first slow path. */
    PyObject *lookups = Py_BuildValue(
        "{s(ssssss)s(sss)s(ss)s(ss)s(ss)s(s)}",
        "WriterCore", "_publish_py", "_publish_many_py", "_claim_py", "_mv",
        "_publish_one_of_batch", "_wakeups",
        "ReaderCore", "_take_py", "_take_bytes_py", "_take_many_bytes_py",
        "Wakeups", "posted_w0", "wake",
        "StreamWriterCore", "_write_py", "_peer",
        "StreamReaderCore", "_readinto_fast_py", "_peer",
        "peer", "release");
    if (lookups == NULL || PyModule_AddObject(m, "LOOKUPS", lookups) < 0) {
        Py_XDECREF(lookups);
        goto fail;
    }
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
    Py_INCREF(&StreamWriterCoreType);
    if (PyModule_AddObject(m, "StreamWriterCore", (PyObject *)&StreamWriterCoreType) < 0) {
        Py_DECREF(&StreamWriterCoreType);
        goto fail;
    }
    Py_INCREF(&StreamReaderCoreType);
    if (PyModule_AddObject(m, "StreamReaderCore", (PyObject *)&StreamReaderCoreType) < 0) {
        Py_DECREF(&StreamReaderCoreType);
        goto fail;
    }
    return m;
fail:
    Py_DECREF(m);
    return NULL;
}
