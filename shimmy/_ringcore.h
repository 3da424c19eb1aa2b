/* What shimmy/_ringcore.c and shimmy/_relaycore.c share: the pub/sub ring's offsets (the
 * same constants as shimmy/ring/layout.py, exported by each module and compared with it at
 * import), the memory-ordering macros, and the buffer export of a ring's mapping that every
 * C type holds as its first member after the object header (``Core``). */
#ifndef SHIMMY_RINGCORE_H
#define SHIMMY_RINGCORE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

/* Offsets: the same constants as shimmy/ring/layout.py, exported by the module and compared
 * with it at import (shimmy/ring/native.py, check_layout): a difference refuses this module. */
#define OFF_MODE 12
#define OFF_MAX_SUBS 24
#define OFF_RETIRED 40
#define OFF_STREAM 272
#define OFF_TAIL 320
#define OFF_HEAD 328
#define OFF_LAST 336
#define OFF_ROOM_WAIT 352
#define OFF_SLOT_HIGH 384
#define OFF_WAITING 448
#define CONTROL_SIZE 4096
#define SLOT_SIZE 64
#define SLOT_OFF_STATE 8
#define SLOT_ACTIVE 1
#define MODE_RELIABLE 0
#define HEADER 16
#define FLAG_PAD 1
#define WIDE_BIT ((uint64_t)1 << 56)
#define REWIND_MIN_FRAME ((uint64_t)1 << 16)

#define LOAD_ACQ(p) __atomic_load_n((uint64_t *)(p), __ATOMIC_ACQUIRE)
#define LOAD_RLX(p) __atomic_load_n((uint64_t *)(p), __ATOMIC_RELAXED)
#define LOAD32(p) __atomic_load_n((uint32_t *)(p), __ATOMIC_RELAXED)
#define STORE_REL(p, v) __atomic_store_n((uint64_t *)(p), (v), __ATOMIC_RELEASE)



/* ---- the mapping ---------------------------------------------------------------------------- */

typedef struct {
    Py_buffer buf;          /* a buffer export of the ring's mmap; buf.obj NULL when detached */
    char *mem;              /* start of the mapping */
    char *data;             /* start of the frame area (mem + data_offset) */
    uint64_t mask;          /* capacity - 1 */
    uint64_t max_message;   /* largest payload */
} Mapping;

static inline int mapping_attach(Mapping *m, PyObject *mm, unsigned long long data_offset,
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

static inline void mapping_detach(Mapping *m) {
    if (m->buf.obj != NULL) {
        PyBuffer_Release(&m->buf);
        m->buf.obj = NULL;
    }
    m->mem = m->data = NULL;
}

static inline int mapping_gone(Mapping *m) {
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

static inline int core_traverse(PyObject *self, visitproc visit, void *arg) {
    Py_VISIT(((Core *)self)->m.buf.obj);
    return 0;
}

static inline void core_dealloc(PyObject *self) {
    PyTypeObject *tp = Py_TYPE(self);
    PyObject_GC_UnTrack(self);
    mapping_detach(&((Core *)self)->m);
    tp->tp_free(self);
}

static inline PyObject *core_detach(PyObject *self, PyObject *unused) {
    mapping_detach(&((Core *)self)->m);
    Py_RETURN_NONE;
}

/* Bytes a frame with an ``n``-byte payload occupies (ring.frame_size). */
static inline uint64_t frame_size(uint64_t n) { return (n + HEADER + 15) & ~(uint64_t)15; }

/* After a commit's tail store, the wake-up handshake (spec/ring.md, "Wake-up protocol"): FENCE,
 * load the waiting bytes, and post the sleepers through the Python Wakeups object at
 * ``owner.<wakeups_attr>`` only when the word differs from the one it scanned last (its
 * ``posted_w0``) or the wide byte says slots past the first word exist.  The ring's writer
 * (_ringcore.c) and a replica's (_relaycore.c) both end their commits here.  0, or -1 with a
 * Python error set. */
static inline int wake_after_commit(PyObject *owner, const char *mem, PyObject *wakeups_attr,
                                    PyObject *posted_attr, PyObject *wake_attr) {
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    uint64_t waiting = LOAD_RLX(mem + OFF_WAITING);
    if (!waiting)
        return 0;
    PyObject *wakeups = PyObject_GetAttr(owner, wakeups_attr);
    if (wakeups == NULL)
        return -1;
    int must = waiting >= WIDE_BIT;
    if (!must) {
        PyObject *posted = PyObject_GetAttr(wakeups, posted_attr);
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
    PyObject *r = must ? PyObject_CallMethodNoArgs(wakeups, wake_attr) : Py_NewRef(Py_None);
    Py_DECREF(wakeups);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

#endif
