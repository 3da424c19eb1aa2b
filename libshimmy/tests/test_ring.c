/* The ring paths of libshimmy on rings made here (as the daemon formats them, ring.format_ring):
 * wrap and PAD frames, reliable back-pressure, lossy lapping with exact loss counts, batches,
 * loans, the publisher taking over a ring left between its two commit stores, validation, and
 * a publisher and a subscriber thread exchanging 300,000 checksummed messages.  Run plain and
 * under AddressSanitizer + UBSan (make -C libshimmy check; tests/test_c_lib.py runs both). */
#include <assert.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>

#include "internal.h"

static int failures;
#define CHECK(cond, ...)                                                                   \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            failures++;                                                                    \
            fprintf(stderr, "%s:%d: check failed: %s: ", __FILE__, __LINE__, #cond);       \
            fprintf(stderr, __VA_ARGS__);                                                  \
            fprintf(stderr, " [%s]\n", shimmy_errmsg());                                   \
        }                                                                                  \
    } while (0)

typedef struct {
    uint8_t *mem;
    size_t size;
    shm_seg seg;
    wakeups wk;
} test_ring;

/* ring.format_ring, then the daemon's slot activation for `subs` subscribers at position 0. */
static void make_ring(test_ring *t, uint32_t mode, uint64_t capacity, uint32_t subs) {
    uint32_t max_subs = 8, data_offset = 4096 + 4096;
    t->size = data_offset + capacity;
    t->mem = mmap(NULL, t->size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    assert(t->mem != MAP_FAILED);
    uint64_t magic = RING_MAGIC;
    uint32_t version = 2;
    memcpy(t->mem, &magic, 8);
    memcpy(t->mem + 8, &version, 4);
    memcpy(t->mem + 12, &mode, 4);
    memcpy(t->mem + 16, &capacity, 8);
    memcpy(t->mem + 24, &max_subs, 4);
    memcpy(t->mem + 28, &data_offset, 4);
    uint32_t n = 4;
    memcpy(t->mem + OFF_NAME, &n, 4);
    memcpy(t->mem + OFF_NAME + 4, "test", 4);
    for (uint32_t s = 0; s < subs; s++) {
        uint32_t active = SLOT_ACTIVE;
        memcpy(t->mem + CONTROL_SIZE + s * SLOT_SIZE + 8, &active, 4);
    }
    memcpy(t->mem + OFF_SLOT_HIGH, &subs, 4);
    int rc = seg_check(&t->seg, t->mem, t->size, 'r');
    assert(rc == 0);
    rc = wakeups_init(&t->wk, &t->seg, "/shimmy-test-no-such-semaphore.s");
    assert(rc == 0);
}

static void free_ring(test_ring *t) {
    wakeups_close(&t->wk);
    munmap(t->mem, t->size);
}

static uint64_t size_of(uint64_t i, uint64_t max) { return 8 + (i * 2654435761ULL) % (max - 7); }

static void fill(uint8_t *buf, uint64_t i, uint64_t n) {
    memcpy(buf, &i, 8);
    for (uint64_t k = 8; k < n; k++)
        buf[k] = (uint8_t)((i + k) % 251);
}

static int intact(const uint8_t *p, uint64_t n, uint64_t *index) {
    memcpy(index, p, 8);
    for (uint64_t k = 8; k < n; k++)
        if (p[k] != (uint8_t)((*index + k) % 251))
            return 0;
    return 1;
}

/* Reliable, one subscriber in lockstep: many wraps (PADs), every message intact and in order,
 * stream_point at the tail exact after each; and the subscriber's copy path. */
static void test_wrap_and_pads(void) {
    test_ring t;
    make_ring(&t, MODE_RELIABLE, 4096, 1);
    ring_writer w;
    CHECK(writer_init(&w, &t.seg, &t.wk, NULL) == 0, "writer_init");
    ring_reader r;
    reader_init(&r, &t.seg, 0, 0, 0, NULL);
    uint8_t buf[2048];
    for (uint64_t i = 0; i < 5000; i++) {
        uint64_t n = size_of(i, 700), seq, pos, at_tail;
        fill(buf, i, n);
        CHECK(writer_publish(&w, buf, n, 0, &seq) == 0 && seq == i, "publish %llu",
              (unsigned long long)i);
        CHECK(stream_point_tail(&t.seg, &pos, &at_tail) == 0 && at_tail == i + 1,
              "stream_point %llu", (unsigned long long)at_tail);
        const uint8_t *p;
        uint64_t len, rseq, lost, where, index;
        if (i % 2) {
            CHECK(reader_take(&r, &p, &len, &rseq, &lost, &where) == 1, "take %llu",
                  (unsigned long long)i);
            CHECK(len == n && rseq == i && lost == 0 && intact(p, len, &index) && index == i,
                  "message %llu", (unsigned long long)i);
        } else {
            uint8_t out[2048];
            CHECK(reader_take_copy(&r, out, sizeof out, &len, &rseq, 1) == 1, "copy");
            CHECK(len == n && rseq == i && intact(out, len, &index) && index == i, "copy %llu",
                  (unsigned long long)i);
        }
    }
    const uint8_t *p;
    uint64_t len, rseq, lost, where;
    CHECK(reader_take(&r, &p, &len, &rseq, &lost, &where) == 0, "caught up");
    free_ring(&t);
}

/* Reliable: a full ring waits for the subscriber, then times out naming the wait. */
static void test_backpressure(void) {
    test_ring t;
    make_ring(&t, MODE_RELIABLE, 4096, 1);
    ring_writer w;
    writer_init(&w, &t.seg, &t.wk, NULL);
    uint8_t buf[512] = {0};
    int rc = 0, n = 0;
    while ((rc = writer_publish(&w, buf, sizeof buf, 0.01, NULL)) == 0)
        n++;
    CHECK(rc == -SHIMMY_E_BACKPRESSURE_TIMEOUT, "rc %d", rc);
    CHECK(n == 7, "published %d before the ring was full", n);
    CHECK(strstr(shimmy_errmsg(), "for the slowest subscriber (publish_timeout)") != NULL,
          "text");
    rc = writer_publish(&w, buf, 2048, 0, NULL);
    CHECK(rc == -SHIMMY_E_MESSAGE_TOO_LARGE, "too large: %d", rc);
    CHECK(strstr(shimmy_errmsg(), "exceeds the largest message 2032 bytes of channel 'test'"),
          "too large text");
    free_ring(&t);
}

/* Lossy: a subscriber that falls behind is lapped; received + lost = published, exactly. */
static void test_lossy_lapping(void) {
    test_ring t;
    make_ring(&t, MODE_LOSSY, 8192, 1);
    ring_writer w;
    writer_init(&w, &t.seg, &t.wk, NULL);
    ring_reader r;
    reader_init(&r, &t.seg, 0, 0, 0, NULL);
    uint8_t buf[1024], out[1024];
    uint64_t received = 0, published = 0, last = 0;
    for (int round = 0; round < 200; round++) {
        int burst = 1 + round % 37;
        for (int k = 0; k < burst; k++, published++) {
            uint64_t n = size_of(published, 600);
            fill(buf, published, n);
            CHECK(writer_publish(&w, buf, n, 0, NULL) == 0, "lossy publish");
        }
        uint64_t len, seq, index;
        for (int k = 0; k < 5; k++) {
            int got = reader_take_copy(&r, out, sizeof out, &len, &seq, 1);
            if (got != 1)
                break;
            CHECK(intact(out, len, &index) && index == seq, "lossy message %llu",
                  (unsigned long long)seq);
            CHECK(received == 0 || seq > last, "order");
            last = seq;
            received++;
        }
    }
    uint64_t len, seq, index;
    while (reader_take_copy(&r, out, sizeof out, &len, &seq, 1) == 1) {
        CHECK(intact(out, len, &index) && index == seq, "drain");
        received++;
    }
    CHECK(received + r.lost_total == published, "received %llu + lost %llu != published %llu",
          (unsigned long long)received, (unsigned long long)r.lost_total,
          (unsigned long long)published);
    CHECK(r.lost_total > 0, "the subscriber was never lapped");
    free_ring(&t);
}

/* Batches across the wrap point; the reader's batch copy; loans; a successor publisher. */
static void test_batches_loans_resume(void) {
    test_ring t;
    make_ring(&t, MODE_RELIABLE, 65536, 1);
    ring_writer w;
    writer_init(&w, &t.seg, &t.wk, NULL);
    ring_reader r;
    reader_init(&r, &t.seg, 0, 0, 0, NULL);
    static uint8_t store[64 * 300];
    struct iovec iov[64];
    uint64_t next = 0, got_n = 0;
    for (int round = 0; round < 300; round++) {
        size_t k = 1 + (size_t)round % 64;
        for (size_t j = 0; j < k; j++) {
            uint64_t n = size_of(next + j, 300);
            fill(store + j * 300, next + j, n);
            iov[j].iov_base = store + j * 300;
            iov[j].iov_len = n;
        }
        size_t published;
        CHECK(writer_publish_many(&w, iov, k, 0, &published) == (int64_t)k && published == k,
              "batch");
        next += k;
        uint8_t out[64 * 320];
        for (;;) {   /* the copy path's batch: one release at the end */
            uint64_t off = 0, len, seq, index;
            int n = 0;
            while (n < 64 && reader_take_copy(&r, out + off, sizeof out - off, &len, &seq, 0) == 1) {
                CHECK(intact(out + off, len, &index) && index == got_n && seq == got_n,
                      "batch message %llu", (unsigned long long)got_n);
                got_n++;
                n++;
                off = (off + len + 15) & ~15ULL;
            }
            reader_release_to(&r, r.position);
            if (n == 0)
                break;
        }
    }
    CHECK(got_n == next, "batches: %llu of %llu", (unsigned long long)got_n,
          (unsigned long long)next);
    void *p;
    CHECK(writer_claim(&w, 100, 0, &p) == 0, "claim");
    fill(p, next, 100);
    CHECK(writer_commit_claim(&w, 100) == next, "commit seq");
    next++;
    /* A publisher killed between `last` and `tail` (spec/ring.md, "Crash points"):
     * a complete frame at the tail that the successor rolls forward. */
    CHECK(writer_claim(&w, 40, 0, &p) == 0, "claim 2");
    fill(p, next, 40);
    st_rel(t.mem + OFF_LAST, w.tail);
    ring_writer successor;
    CHECK(writer_init(&successor, &t.seg, &t.wk, NULL) == 0, "successor");
    CHECK(successor.seq == next + 1, "successor seq %llu", (unsigned long long)successor.seq);
    const uint8_t *m;
    uint64_t len, seq, lost, at, index;
    CHECK(reader_take(&r, &m, &len, &seq, &lost, &at) == 1 && seq == next - 1 && len == 100,
          "loaned message");
    CHECK(reader_take(&r, &m, &len, &seq, &lost, &at) == 1 && seq == next && len == 40 &&
          intact(m, len, &index) && index == next, "rolled forward");
    free_ring(&t);
}

/* A frame whose flags are neither 0 nor PAD is RingCorrupted naming the channel and offset. */
static void test_corrupted(void) {
    test_ring t;
    make_ring(&t, MODE_RELIABLE, 4096, 1);
    ring_writer w;
    writer_init(&w, &t.seg, &t.wk, NULL);
    uint8_t buf[32] = {0};
    writer_publish(&w, buf, sizeof buf, 0, NULL);
    uint32_t bad = 7;
    memcpy(t.seg.data + 4, &bad, 4);
    ring_reader r;
    reader_init(&r, &t.seg, 0, 0, 0, NULL);
    const uint8_t *m;
    uint64_t len, seq, lost, at;
    int rc = reader_take(&r, &m, &len, &seq, &lost, &at);
    CHECK(rc == -SHIMMY_E_RING_CORRUPTED, "rc %d", rc);
    CHECK(strstr(shimmy_errmsg(), "channel 'test' is corrupted: bad frame header (length 32, "
                 "flags 0x7) (segment offset 8192)") != NULL, "text");
    free_ring(&t);
}

/* A publisher thread and a subscriber thread (reliable, zero copy), 300,000 messages. */
typedef struct {
    test_ring *t;
    uint64_t count;
    int bad;
} thread_args;

static void *publisher_thread(void *arg) {
    thread_args *a = arg;
    ring_writer w;
    writer_init(&w, &a->t->seg, &a->t->wk, NULL);
    uint8_t buf[512];
    for (uint64_t i = 0; i < a->count; i++) {
        uint64_t n = size_of(i, 500);
        fill(buf, i, n);
        if (writer_publish(&w, buf, n, 10, NULL) != 0)
            a->bad = 1;
    }
    return NULL;
}

static void test_threads(void) {
    test_ring t;
    make_ring(&t, MODE_RELIABLE, 16384, 1);
    thread_args a = {&t, 300000, 0};
    pthread_t th;
    pthread_create(&th, NULL, publisher_thread, &a);
    ring_reader r;
    reader_init(&r, &t.seg, 0, 0, 0, NULL);
    uint64_t got = 0;
    while (got < a.count) {
        const uint8_t *m;
        uint64_t len, seq, lost, at, index;
        int rc = reader_take(&r, &m, &len, &seq, &lost, &at);
        if (rc < 0) {
            CHECK(0, "take failed");
            break;
        }
        if (rc == 0) {
            sched_yield();
            continue;
        }
        if (!intact(m, len, &index) || index != got || seq != got || len != size_of(got, 500)) {
            CHECK(0, "thread message %llu", (unsigned long long)got);
            break;
        }
        got++;
    }
    reader_release_to(&r, r.position);
    pthread_join(th, NULL);
    CHECK(!a.bad && got == a.count, "threads: %llu", (unsigned long long)got);
    free_ring(&t);
}

int main(void) {
    test_wrap_and_pads();
    test_backpressure();
    test_lossy_lapping();
    test_batches_loans_resume();
    test_corrupted();
    test_threads();
    if (failures) {
        fprintf(stderr, "test_ring: %d checks failed\n", failures);
        return 1;
    }
    printf("test_ring: all checks passed\n");
    return 0;
}
