/* libshimmy internals: the ring (ring.c), the control client (control.c), errors (error.c).
 * Offsets and rules: spec/ring.md, spec/stream.md (one text of each rule; the
 * comments here point at it). */
#ifndef SHIMMY_INTERNAL_H
#define SHIMMY_INTERNAL_H

#include <pthread.h>
#include <semaphore.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#include <msgpack.h>

#include "shimmy.h"

/* ---- errors (error.c) -------------------------------------------------------------------- */
/* Set this thread's error text; returns -code (for `return fail(...)`). */
int shm_fail(int code, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
int shm_retired(const char *name);   /* SHIMMY_E_RETIRED with ChannelRetired's text */
int shm_code_from_name(const char *name, size_t len);
/* A number of seconds as Python prints a float ("2.0", "0.25"), for error texts. */
void fmt_secs(char *out, size_t n, double s);
/* Formats a variadic function's own arguments (those after its last named one, `fmt`) into the
 * char array `buf` (truncated to fit): the one copy of va_start/vsnprintf/va_end. */
#define FORMAT_VARGS(buf, fmt)                          \
    do {                                                \
        va_list ap_;                                    \
        va_start(ap_, fmt);                             \
        vsnprintf((buf), sizeof(buf), (fmt), ap_);      \
        va_end(ap_);                                    \
    } while (0)

/* ---- atomics: the orderings of spec/ring.md, "The C paths" ------------------------ */
static inline uint64_t ld_acq(const void *p) {
    return atomic_load_explicit((_Atomic uint64_t *)(uintptr_t)p, memory_order_acquire);
}
static inline uint64_t ld_rlx(const void *p) {
    return atomic_load_explicit((_Atomic uint64_t *)(uintptr_t)p, memory_order_relaxed);
}
static inline uint32_t ld32_rlx(const void *p) {
    return atomic_load_explicit((_Atomic uint32_t *)(uintptr_t)p, memory_order_relaxed);
}
static inline void st_rel(void *p, uint64_t v) {
    atomic_store_explicit((_Atomic uint64_t *)p, v, memory_order_release);
}
static inline void st_rlx(void *p, uint64_t v) {
    atomic_store_explicit((_Atomic uint64_t *)p, v, memory_order_relaxed);
}
static inline void st8_rlx(void *p, uint8_t v) {
    atomic_store_explicit((_Atomic uint8_t *)p, v, memory_order_relaxed);
}

/* ---- the pub/sub ring (ring.c) ----------------------------------------------------------- */
#define RING_MAGIC 0x474E4952594D4853ULL   /* "SHMYRING" as a little-endian u64 */
#define OFF_MAGIC 0
#define OFF_VERSION 8
#define OFF_MODE 12
#define OFF_CAPACITY 16
#define OFF_MAX_SUBS 24
#define OFF_DATA_OFFSET 28
#define OFF_RETIRED 40
#define OFF_GROUP_EPOCH 56
#define OFF_NAME 64
#define OFF_TAIL 320
#define OFF_HEAD 328
#define OFF_LAST 336
#define OFF_WAITS 344
#define OFF_ROOM_WAIT 352   /* publisher: the position it waits for (spec/ring.md, "Waiting for room") */
#define OFF_SLOT_HIGH 384
#define OFF_WAITING 448
#define CONTROL_SIZE 4096
#define SLOT_SIZE 64
#define SLOT_OFF_LOST 24
#define SLOT_ACTIVE 1
#define SLOT_EVICTED 2
#define HEADER 16
#define FLAG_PAD 1
#define WIDE_BIT ((uint64_t)1 << 56)
#define MAX_SEQ_GAP ((uint64_t)1 << 40)
#define MAX_SUBSCRIBERS_LIMIT (CONTROL_SIZE - OFF_WAITING - 1)
#define MIN_CAPACITY 4096ULL
#define MAX_CAPACITY (1ULL << 30)
#define MODE_RELIABLE 0
#define MODE_LOSSY 1

static inline uint64_t frame_size(uint64_t n) { return (n + HEADER + 15) & ~(uint64_t)15; }
static inline uint64_t waiting_offset(uint32_t slot) { return OFF_WAITING + slot + (slot >= 7); }

/* A mapped segment (a pub/sub ring or, with kind 's', a stream), validated. */
typedef struct {
    uint8_t *mem;
    size_t size;
    uint8_t *data;
    uint64_t cap, mask, max_message;
    uint32_t mode, max_subs;
    char name[256];
    char kind;   /* 'r' ring, 's' stream */
} shm_seg;

/* Map the shared-memory object `shm_name` ("/shimmy...") read-write and validate its header. */
int seg_map(const char *shm_name, char kind, shm_seg *seg);
/* Validate a segment already in memory (a mapping of a ring image, say). */
int seg_check(shm_seg *seg, uint8_t *mem, size_t size, char kind);
void seg_unmap(shm_seg *seg);
int seg_corrupted(const shm_seg *seg, uint64_t offset, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Posts the semaphores of a ring's sleeping subscribers (ring.Wakeups). */
typedef struct {
    shm_seg *seg;
    char prefix[256];
    uint8_t *posted;   /* epoch posted last, per slot */
    sem_t **sems;      /* opened lazily, per slot */
    uint64_t posted_w0;
} wakeups;

int wakeups_init(wakeups *w, shm_seg *seg, const char *sem_prefix);
void wakeups_close(wakeups *w);
int wakeups_wake(wakeups *w);

/* The one publisher of a ring (ring.RingWriter). */
typedef struct {
    shm_seg *seg;
    wakeups *wk;
    uint64_t tail, head, seq, limit;
    double backoff_max;
    uint64_t loan_n;   /* bytes claimed by shimmy_loan, UINT64_MAX when none */
    char room_name[256];   /* the ring's room semaphore ("": none, poll) */
    sem_t *room;           /* opened at the first wait for room */
} ring_writer;

/* `room`: the ring's room semaphore from the daemon's reply (NULL or "": none, poll). */
int writer_init(ring_writer *w, shm_seg *seg, wakeups *wk, const char *room);
void writer_close(ring_writer *w);   /* closes its room semaphore; the mapping stays */
int writer_publish(ring_writer *w, const void *data, uint64_t n, double timeout, uint64_t *seq);
int64_t writer_publish_many(ring_writer *w, const struct iovec *msgs, size_t count,
                            double timeout, size_t *published);
int writer_claim(ring_writer *w, uint64_t n, double timeout, void **buf);
uint64_t writer_commit_claim(ring_writer *w, uint64_t n);
/* (position, seq) where a new reader starts at the tail: ring.stream_point(oldest=False). */
int stream_point_tail(shm_seg *seg, uint64_t *position, uint64_t *seq);
/* ring.stream_point(oldest=True): the oldest intact message (the tail when there is none). */
int stream_point_oldest(shm_seg *seg, uint64_t *position, uint64_t *seq);

/* One subscriber's cursor (ring.RingReader, ring.GroupReader when group != NULL). */
typedef struct {
    shm_seg *seg;
    uint64_t pos_off;      /* byte offset of its slot's position word */
    uint64_t position, tail, expect, lost_total;
    uint32_t publisher;
    const uint32_t *group; /* the channel ring's group_epoch word (a member ring), or NULL */
    uint32_t group_epoch;
    int merged, turn;
    char room_name[256];   /* the ring's room semaphore, posted for a waiting publisher */
    sem_t *room;           /* opened at the first post */
    uint64_t room_posted;  /* the room_wait value posted last */
} ring_reader;

/* `room`: the ring's room semaphore from the daemon's reply (NULL or "": posts nothing). */
void reader_init(ring_reader *r, shm_seg *seg, uint32_t slot, uint64_t position, uint64_t seq,
                 const char *room);
void reader_close(ring_reader *r);   /* closes its room semaphore; the mapping stays */
/* 1: a frame (payload at *payload, *len, *seq, *lost); 0: nothing (caught up; for a group
 * member also: its batch is done or the group epoch moved); < 0 an error. */
int reader_take(ring_reader *r, const uint8_t **payload, uint64_t *len, uint64_t *seq,
                uint64_t *lost, uint64_t *at);
/* Copy path: 1 copied into buf (released), 0 nothing, < 0 error (a message over cap is
 * SHIMMY_E_INVALID_ARGUMENT, left unread).  `release`: store the position after the copy. */
int reader_take_copy(ring_reader *r, uint8_t *buf, uint64_t cap, uint64_t *len, uint64_t *seq,
                     int release);
void reader_release_to(ring_reader *r, uint64_t pos);
int reader_has_data(const ring_reader *r);
int reader_head_at_most(const ring_reader *r, uint64_t pos);

/* ---- streams without a daemon (stream.c): an end over a segment already mapped, without
 * semaphores (the conformance runner's images) -------------------------------------------- */
shimmy_stream *stream_attach(const shm_seg *seg, enum shimmy_role role, int *rc);
void stream_detach(shimmy_stream *s);   /* frees the end; the mapping stays the caller's */
int64_t stream_write_nowait(shimmy_stream *s, const void *data, size_t n);
void stream_finish(shimmy_stream *s);   /* writer: end of stream; reader: closed */

/* ---- the control client (control.c) ------------------------------------------------------ */
/* A reply: the unpacked map, alive until reply_free (its strings point into buf). */
typedef struct {
    msgpack_unpacked u;
    const msgpack_object *map;
    char *buf;
} ctl_reply;

/* Fields of a request: "s:key" const char*, "i:key" int64_t, "o:key" int64_t omitted when 0,
 * "b:key" int (bool); NULL ends.  A NULL string value omits its field. */
int ctl_request(shimmy_client *c, const char *op, ctl_reply *reply, ...);
void reply_free(ctl_reply *reply);
const msgpack_object *mp_get(const msgpack_object *map, const char *key);
int mp_int(const msgpack_object *map, const char *key, int64_t *out);
int mp_str(const msgpack_object *map, const char *key, char *out, size_t cap);
int mp_double(const msgpack_object *map, const char *key, double *out);
int client_closed(shimmy_client *c);

/* ---- waiting ----------------------------------------------------------------------------- */
double mono_now(void);
void full_fence(void);
/* Wait on `sem` for at most `seconds`: 1 posted, 0 timed out. */
int sem_wait_for(sem_t *sem, double seconds);
int validate_name(const char *name);

#endif
