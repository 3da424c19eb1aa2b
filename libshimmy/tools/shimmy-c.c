/* shimmy-c: a command built from libshimmy, for users, tests and the conformance runner.
 * `shimmy-c --help` lists the commands; the message and stream patterns are the contract of
 * the issue that introduced it (and of tests/test_c_*.py, which check them from Python). */
#include <getopt.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "shimmy.h"

static const char USAGE[] =
    "usage: shimmy-c COMMAND [options] NAME\n"
    "\n"
    "commands:\n"
    "  pub     publish --count N numbered messages of --size S bytes (S >= 8): bytes 0-7 are\n"
    "          the message's index as a little-endian u64, byte k >= 8 is (index + k) % 251\n"
    "  sub     receive --count N messages and check each one's bytes and that the indexes go\n"
    "          up by one (per publisher); prints 'received N in order from #FIRST' and exits\n"
    "          0, or names the first bad message and exits 1.  Lossy: an index may jump by\n"
    "          exactly the message's 'lost'; stops once received + lost = N, then prints\n"
    "          'lost L' on a second line\n"
    "  stream-write  write --size B bytes to stream NAME (byte i is (i + i / 509) % 251), close\n"
    "  stream-read   read the stream to its end, check every byte as stream-write makes them;\n"
    "          prints 'read B bytes in order' and exits 0, or names the first bad byte, exit 1\n"
    "  conform-read, conform-point, conform-write, conform-frames   the command contract of\n"
    "          the conformance vectors (spec/vectors/README.md)\n"
    "  ping, echo, blast, drain   the benchmark sides shimmy bench drives (shimmy/bench/clib.py):\n"
    "          ping/echo time round trips over NAME/a2b and NAME/b2a, blast/drain one-way\n"
    "          messages on NAME; each prints one JSON line of figures\n"
    "\n"
    "options:\n"
    "  --daemon SOCK        the daemon's control socket (default $SHIMMY_DAEMON, then\n"
    "                       /run/shimmy/shimmyd.sock)\n"
    "  --count N            messages to publish / receive\n"
    "  --size S             message size (pub; sub checks it when given); stream bytes\n"
    "  --mixed              pub, sub: message i has 8 + (i * 2654435761 mod (S - 7)) bytes\n"
    "  --first K            pub: the first index (default 0)\n"
    "  --start oldest|next  sub: where to start (default next)\n"
    "  --mode reliable|lossy, --capacity B, --max-publishers P   channel options at open\n"
    "  --batch K            pub: publish in batches of K (shimmy_publish_many)\n"
    "  --loan               pub: zero-copy publish (shimmy_loan + shimmy_commit)\n"
    "  --receive view|copy|many   sub: zero-copy views (default), copies, or batches\n"
    "  --timeout T          sub, stream-read: seconds to wait for each message (default 30)\n"
    "  --ready FILE         sub, stream-read: create FILE once subscribed / attached\n"
    "  --chunk C            stream-write: bytes per write call (default 65536)\n"
    "  --linger T           pub: keep the channel open T seconds after the last message\n"
    "  --seconds T, --warmup N    ping, blast: how long to measure; ping: round trips first\n"
    "  --spin-us U          receivers' spin before sleeping (default 100)\n"
    "  --go-stdin           ping, echo, blast, drain: once set up (--ready), wait for a byte on\n"
    "                       stdin before starting\n";

typedef struct {
    const char *daemon, *name, *start, *mode, *receive, *ready;
    uint64_t count, size, first, capacity, batch, chunk;
    uint32_t max_publishers;
    int mixed, loan, go_stdin, spin_us;
    double timeout, linger, seconds;
    uint64_t warmup;
} opts;

static int fail(const char *what, int rc) {
    fprintf(stderr, "shimmy-c: %s: %s (%s)\n", what, shimmy_errmsg(), shimmy_code_name(rc));
    return 1;
}

static uint64_t msg_size(const opts *o, uint64_t index) {
    if (!o->mixed)
        return o->size;
    return 8 + (index * 2654435761ULL) % (o->size - 7);
}

static void fill(uint8_t *buf, uint64_t index, uint64_t n) {
    memcpy(buf, &index, 8);   /* little-endian hosts only (x86-64, AArch64) */
    for (uint64_t k = 8; k < n; k++)
        buf[k] = (uint8_t)((index + k) % 251);
}

static uint8_t stream_byte(uint64_t i) { return (uint8_t)((i + i / 509) % 251); }

static void touch(const char *path) {
    if (path == NULL)
        return;
    FILE *f = fopen(path, "w");
    if (f != NULL)
        fclose(f);
}

static int open_channel(const opts *o, shimmy_client **c, shimmy_channel **ch) {
    int rc = shimmy_connect(o->daemon, c);
    if (rc < 0)
        return fail("connect", rc);
    shimmy_channel_opts co = shimmy_channel_defaults();
    co.mode = o->mode;
    co.capacity = o->capacity;
    co.max_publishers = o->max_publishers;
    if ((rc = shimmy_channel_open(*c, o->name, &co, ch)) < 0) {
        shimmy_disconnect(*c);
        return fail("open", rc);
    }
    return 0;
}

static int cmd_pub(const opts *o) {
    if (o->size < 8) {
        fprintf(stderr, "shimmy-c pub: --size must be at least 8 (the index), got %" PRIu64 "\n",
                o->size);
        return 2;
    }
    shimmy_client *c;
    shimmy_channel *ch;
    if (open_channel(o, &c, &ch))
        return 1;
    int rc = 0;
    uint64_t batch = o->batch ? o->batch : 1;
    uint8_t *buf = malloc(o->size * batch + 16);
    struct iovec *iov = calloc(batch, sizeof *iov);
    for (uint64_t i = 0; i < o->count && rc >= 0;) {
        uint64_t index = o->first + i;
        if (o->loan) {
            void *p;
            uint64_t n = msg_size(o, index);
            if ((rc = shimmy_loan(ch, n, &p)) < 0)
                break;
            fill(p, index, n);
            rc = shimmy_commit(ch, NULL);
            i++;
        } else if (o->batch) {
            uint64_t k = 0, off = 0;
            for (; k < batch && i + k < o->count; k++) {
                uint64_t n = msg_size(o, index + k);
                fill(buf + off, index + k, n);
                iov[k].iov_base = buf + off;
                iov[k].iov_len = n;
                off += n;
            }
            int64_t got = shimmy_publish_many(ch, iov, k, NULL);
            rc = got < 0 ? (int)got : 0;
            i += k;
        } else {
            uint64_t n = msg_size(o, index);
            fill(buf, index, n);
            rc = shimmy_publish(ch, buf, n, NULL);
            i++;
        }
    }
    free(buf);
    free(iov);
    if (rc < 0) {
        fail("publish", rc);
    } else if (o->linger > 0) {
        struct timespec ts = {(time_t)o->linger,
                              (long)((o->linger - (double)(time_t)o->linger) * 1e9)};
        nanosleep(&ts, NULL);
    }
    shimmy_channel_close(ch);
    shimmy_disconnect(c);
    return rc < 0;
}

#define MAX_PUBS 1024

/* Check one received message: its bytes, and its index against its publisher's last. */
static char report[256];   /* what check() found wrong, printed if it stands */

static int check(const opts *o, const uint8_t *data, size_t len, uint32_t publisher,
                 uint64_t lost, uint64_t *expect, int *seen, uint64_t nth) {
    if (len < 8) {
        snprintf(report, sizeof report,
                 "message %" PRIu64 " has %zu bytes, fewer than the 8 of its index\n", nth, len);
        return 1;
    }
    uint64_t index;
    memcpy(&index, data, 8);
    if (o->size && len != msg_size(o, index)) {
        snprintf(report, sizeof report,
                 "message %" PRIu64 " (#%" PRIu64 ") has %zu bytes, expected %" PRIu64 "\n", nth,
               index, len, msg_size(o, index));
        return 1;
    }
    for (size_t k = 8; k < len; k++)
        if (data[k] != (uint8_t)((index + k) % 251)) {
            snprintf(report, sizeof report,
                     "message %" PRIu64 " (#%" PRIu64 ") byte %zu is %u, expected %u\n", nth, index,
                   k, data[k], (unsigned)((index + k) % 251));
            return 1;
        }
    uint32_t p = publisher % MAX_PUBS;
    if (seen[p] && index != expect[p] + lost) {
        snprintf(report, sizeof report,
                 "message %" PRIu64 " is #%" PRIu64 " from publisher %u, expected #%" PRIu64
               " (lost %" PRIu64 ")\n", nth, index, publisher, expect[p] + lost, lost);
        return 1;
    }
    seen[p] = 1;
    expect[p] = index + 1;
    return 0;
}

static int cmd_sub(const opts *o) {
    shimmy_client *c;
    shimmy_channel *ch;
    if (open_channel(o, &c, &ch))
        return 1;
    shimmy_sub *sub;
    int rc = shimmy_subscribe(ch, o->start && !strcmp(o->start, "oldest") ? SHIMMY_START_OLDEST
                                                                          : SHIMMY_START_NEXT,
                              &sub);
    if (rc < 0) {
        fail("subscribe", rc);
        shimmy_channel_close(ch);
        shimmy_disconnect(c);
        return 1;
    }
    touch(o->ready);
    int lossy = !strcmp(shimmy_channel_mode(ch), "lossy");
    size_t cap = shimmy_channel_max_message(ch) > 64 << 20 ? 64 << 20
                                                           : shimmy_channel_max_message(ch);
    if (!strcmp(o->receive, "many"))
        cap = 4 * cap + 64;
    uint8_t *buf = malloc(cap);
    enum { MAXN = 256 };
    size_t lens[MAXN];
    uint64_t seqs[MAXN];
    uint64_t *expect = calloc(MAX_PUBS, sizeof *expect);
    int *seen = calloc(MAX_PUBS, sizeof *seen);
    uint64_t received = 0, first = 0, lost_seen = 0, overwritten = 0;
    int bad = 0;
    while (!bad && received + (lossy ? shimmy_sub_lost(sub) + overwritten : 0) < o->count) {
        if (!strcmp(o->receive, "view")) {
            shimmy_message m;
            if ((rc = shimmy_receive(sub, &m, o->timeout)) < 0)
                break;
            if (received == 0)
                memcpy(&first, m.data, m.len >= 8 ? 8 : 0);
            uint32_t pp = m.publisher % MAX_PUBS;
            uint64_t prev = expect[pp];
            int was_seen = seen[pp];
            bad = check(o, m.data, m.len, m.publisher, m.lost, expect, seen, received);
            if (lossy && !shimmy_message_valid(&m)) {
                expect[pp] = prev + m.lost + 1;
                seen[pp] = was_seen;
                /* overwritten while checked (lossy): what was read proves nothing, and the
                 * message counts as lost, as Message.__bytes__ raising would make it */
                bad = 0;
                overwritten++;
                continue;
            }
            received++;
        } else if (!strcmp(o->receive, "copy")) {
            size_t len;
            uint64_t before = shimmy_sub_lost(sub);
            if ((rc = shimmy_receive_copy(sub, buf, cap, &len, NULL, o->timeout)) < 0)
                break;
            if (received == 0)
                memcpy(&first, buf, len >= 8 ? 8 : 0);
            bad = check(o, buf, len, shimmy_sub_last_publisher(sub),
                        shimmy_sub_lost(sub) - before, expect, seen, received);
            received++;
        } else {
            uint64_t before = shimmy_sub_lost(sub);
            int64_t n = shimmy_receive_many(sub, buf, cap, lens, seqs, MAXN, o->timeout);
            if (n < 0) {
                rc = (int)n;
                break;
            }
            uint64_t lost = shimmy_sub_lost(sub) - before, off = 0;
            for (int64_t i = 0; i < n && !bad; i++) {
                if (received == 0)
                    memcpy(&first, buf + off, lens[i] >= 8 ? 8 : 0);
                /* a batch's losses come before the messages they precede: check the index
                 * jumps against the batch's total, which bounds them */
                uint32_t pub = shimmy_sub_last_publisher(sub);
                uint64_t idx;
                memcpy(&idx, buf + off, 8);
                uint64_t gap = seen[pub % MAX_PUBS] ? idx - expect[pub % MAX_PUBS] : 0;
                if (gap > lost) {
                    snprintf(report, sizeof report, "message %" PRIu64 " is #%" PRIu64 ", expected #%" PRIu64 "\n",
                           received, idx, expect[pub % MAX_PUBS]);
                    bad = 1;
                    break;
                }
                lost -= gap;
                bad = check(o, buf + off, lens[i], pub, gap, expect, seen, received);
                off = (off + lens[i] + 15) & ~(uint64_t)15;
                received++;
            }
        }
    }
    lost_seen = shimmy_sub_lost(sub) + overwritten;
    free(buf);
    free(expect);
    free(seen);
    if (bad)
        printf("%s", report);
    shimmy_sub_close(sub);
    shimmy_channel_close(ch);
    shimmy_disconnect(c);
    if (bad)
        return 1;
    if (rc < 0) {
        printf("received %" PRIu64 " messages, then: %s\n", received, shimmy_errmsg());
        return fail("receive", rc);
    }
    if (!lossy && lost_seen) {
        printf("reliable channel lost %" PRIu64 " messages\n", lost_seen);
        return 1;
    }
    printf("received %" PRIu64 " in order from #%" PRIu64 "\n", received, first);
    if (lossy && lost_seen)
        printf("lost %" PRIu64 "\n", lost_seen);
    return 0;
}

static int cmd_stream_write(const opts *o) {
    shimmy_client *c;
    shimmy_stream *s;
    int rc = shimmy_connect(o->daemon, &c);
    if (rc < 0)
        return fail("connect", rc);
    if ((rc = shimmy_stream_open(c, o->name, SHIMMY_WRITER, o->capacity, &s)) < 0) {
        shimmy_disconnect(c);
        return fail("stream open", rc);
    }
    uint64_t chunk = o->chunk ? o->chunk : 65536;
    uint8_t *buf = malloc(chunk);
    for (uint64_t at = 0; at < o->size && rc >= 0; at += chunk) {
        uint64_t n = o->size - at < chunk ? o->size - at : chunk;
        for (uint64_t i = 0; i < n; i++)
            buf[i] = stream_byte(at + i);
        rc = shimmy_stream_write(s, buf, n, o->timeout, NULL);
    }
    free(buf);
    if (rc < 0)
        fail("stream write", rc);
    shimmy_stream_close(s);
    shimmy_disconnect(c);
    return rc < 0;
}

static int cmd_stream_read(const opts *o) {
    shimmy_client *c;
    shimmy_stream *s;
    int rc = shimmy_connect(o->daemon, &c);
    if (rc < 0)
        return fail("connect", rc);
    if ((rc = shimmy_stream_open(c, o->name, SHIMMY_READER, o->capacity, &s)) < 0) {
        shimmy_disconnect(c);
        return fail("stream open", rc);
    }
    touch(o->ready);
    uint8_t *buf = malloc(1 << 16);
    uint64_t at = 0;
    int bad = 0;
    int64_t n;
    while ((n = shimmy_stream_read(s, buf, 1 << 16, o->timeout)) > 0 && !bad) {
        for (int64_t i = 0; i < n; i++)
            if (buf[i] != stream_byte(at + (uint64_t)i)) {
                printf("byte %" PRIu64 " is %u, expected %u\n", at + (uint64_t)i, buf[i],
                       stream_byte(at + (uint64_t)i));
                bad = 1;
                break;
            }
        at += (uint64_t)n;
    }
    free(buf);
    shimmy_stream_close(s);
    shimmy_disconnect(c);
    if (bad)
        return 1;
    if (n < 0)
        return fail("stream read", (int)n);
    if (o->size && at != o->size) {
        printf("read %" PRIu64 " bytes, expected %" PRIu64 "\n", at, o->size);
        return 1;
    }
    printf("read %" PRIu64 " bytes in order\n", at);
    return 0;
}

/* ---- benchmark sides (shimmy/bench/clib.py; the same protocol as bench/peers.ShimmyLink:
 * an empty message takes the publisher role and is skipped by receivers, a 1-byte message
 * ends a run) ---------------------------------------------------------------------------- */

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static double cpu_s(void) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec * 1e-6 +
           (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec * 1e-6;
}

typedef struct {
    shimmy_client *c;
    shimmy_channel *tx, *rx;
    shimmy_sub *sub;
} bench_link;

/* rx first (subscribed from next), then tx with the role taken; then ready and go */
static int link_open(const opts *o, const char *tx, const char *rx, bench_link *l) {
    memset(l, 0, sizeof *l);
    int rc = shimmy_connect(o->daemon, &l->c);
    if (rc < 0)
        return fail("connect", rc);
    shimmy_channel_opts co = shimmy_channel_defaults();
    co.capacity = o->capacity;
    co.spin_us = o->spin_us;
    if (rx != NULL && ((rc = shimmy_channel_open(l->c, rx, &co, &l->rx)) < 0 ||
                       (rc = shimmy_subscribe(l->rx, SHIMMY_START_NEXT, &l->sub)) < 0))
        return fail("subscribe", rc);
    if (tx != NULL && ((rc = shimmy_channel_open(l->c, tx, &co, &l->tx)) < 0 ||
                       (rc = shimmy_publish(l->tx, "", 0, NULL)) < 0))
        return fail("publish", rc);
    touch(o->ready);
    if (o->go_stdin && getchar() == EOF)
        return 1;
    return 0;
}

static void link_close(bench_link *l) {
    if (l->sub)
        shimmy_sub_close(l->sub);
    if (l->rx)
        shimmy_channel_close(l->rx);
    if (l->tx)
        shimmy_channel_close(l->tx);
    if (l->c)
        shimmy_disconnect(l->c);
}

/* the next non-empty message as a view */
static int recv_view(bench_link *l, shimmy_message *m) {
    int rc;
    do
        rc = shimmy_receive(l->sub, m, 10.0);
    while (rc == 0 && m->len == 0);
    return rc;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

/* harness.percentile: nearest rank */
static double pct(const uint64_t *v, size_t n, double p) {
    long k = (long)(p / 100.0 * (double)n + 0.5 + 0.5) - 1;
    if (k < 0)
        k = 0;
    if ((size_t)k > n - 1)
        k = (long)n - 1;
    return (double)v[k] / 1e3;
}

#define MAX_ITERS 200000

static int cmd_echo(const opts *o) {
    char tx[300], rx[300];
    snprintf(tx, sizeof tx, "%s/b2a", o->name);
    snprintf(rx, sizeof rx, "%s/a2b", o->name);
    bench_link l;
    int rc = link_open(o, tx, rx, &l);
    uint64_t n = 0;
    double c0 = cpu_s();
    while (rc == 0) {
        shimmy_message m;
        if ((rc = recv_view(&l, &m)) < 0) {
            fail("receive", rc);
            break;
        }
        if (m.len == 1)
            break;
        if ((rc = shimmy_publish(l.tx, m.data, m.len, NULL)) < 0) {
            fail("publish", rc);
            break;
        }
        n++;
    }
    if (rc == 0)
        printf("{\"n\": %" PRIu64 ", \"cpu_s\": %.6f}\n", n, cpu_s() - c0);
    link_close(&l);
    return rc != 0;
}

static int cmd_ping(const opts *o) {
    char tx[300], rx[300];
    snprintf(tx, sizeof tx, "%s/a2b", o->name);
    snprintf(rx, sizeof rx, "%s/b2a", o->name);
    bench_link l;
    int rc = link_open(o, tx, rx, &l);
    uint8_t *data = malloc(o->size ? o->size : 1);
    uint64_t *lat = malloc(MAX_ITERS * sizeof *lat);
    for (uint64_t k = 0; k < o->size; k++)
        data[k] = (uint8_t)(k * 7 + 1);
    shimmy_message m;
    for (uint64_t i = 0; rc == 0 && i < o->warmup; i++)
        if ((rc = shimmy_publish(l.tx, data, o->size, NULL)) < 0 || (rc = recv_view(&l, &m)) < 0)
            fail("warm-up", rc);
    size_t n = 0;
    double c0 = cpu_s(), t_start = now_s(), t_end = t_start + o->seconds;
    while (rc == 0 && n < MAX_ITERS) {
        struct timespec a, b;
        clock_gettime(CLOCK_MONOTONIC, &a);
        if ((rc = shimmy_publish(l.tx, data, o->size, NULL)) < 0 || (rc = recv_view(&l, &m)) < 0) {
            fail("round trip", rc);
            break;
        }
        clock_gettime(CLOCK_MONOTONIC, &b);
        lat[n++] = (uint64_t)((b.tv_sec - a.tv_sec) * 1000000000LL + (b.tv_nsec - a.tv_nsec));
        if ((double)b.tv_sec + (double)b.tv_nsec * 1e-9 > t_end)
            break;
    }
    double wall = now_s() - t_start, cpu = cpu_s() - c0;
    if (rc == 0 && (rc = shimmy_publish(l.tx, "E", 1, NULL)) < 0)
        fail("end", rc);
    if (rc == 0 && n > 0) {
        qsort(lat, n, sizeof *lat, cmp_u64);
        double sum = 0;
        for (size_t i = 0; i < n; i++)
            sum += (double)lat[i];
        printf("{\"iters\": %zu, \"wall_s\": %.6f, \"cpu_s\": %.6f, \"warmup\": %" PRIu64
               ", \"p50_us\": %.4f, \"p99_us\": %.4f, \"p999_us\": %.4f, \"min_us\": %.4f, "
               "\"mean_us\": %.4f}\n", n, wall, cpu, o->warmup, pct(lat, n, 50), pct(lat, n, 99),
               pct(lat, n, 99.9), (double)lat[0] / 1e3, sum / (double)n / 1e3);
    }
    free(data);
    free(lat);
    link_close(&l);
    return rc != 0;
}

static int cmd_blast(const opts *o) {
    bench_link l;
    int rc = link_open(o, o->name, NULL, &l);
    uint64_t step = o->size >= 1 << 18 ? 1 : 32, batch = o->batch, n = 0;
    uint8_t *data = malloc(o->size ? o->size : 1);
    for (uint64_t k = 0; k < o->size; k++)
        data[k] = (uint8_t)(k * 7 + 1);
    struct iovec *iov = calloc(batch ? batch : 1, sizeof *iov);
    for (uint64_t k = 0; k < batch; k++)
        iov[k] = (struct iovec){data, o->size};
    double c0 = cpu_s(), t0 = now_s(), end = t0 + o->seconds;
    while (rc == 0) {
        if (batch) {
            int64_t got = shimmy_publish_many(l.tx, iov, batch, NULL);
            rc = got < 0 ? (int)got : 0;
            n += batch;
        } else {
            for (uint64_t k = 0; k < step && rc == 0; k++) {
                if (o->loan) {
                    void *buf;
                    if ((rc = shimmy_loan(l.tx, o->size, &buf)) == 0) {
                        memcpy(buf, data, o->size);
                        rc = shimmy_commit(l.tx, NULL);
                    }
                } else {
                    rc = shimmy_publish(l.tx, data, o->size, NULL);
                }
            }
            n += step;
        }
        if (rc < 0)
            fail("publish", rc);
        else if (now_s() >= end)
            break;
    }
    double t1 = now_s(), cpu = cpu_s() - c0;
    if (rc == 0 && (rc = shimmy_publish(l.tx, "E", 1, NULL)) < 0)
        fail("end", rc);
    if (rc == 0)
        printf("{\"n\": %" PRIu64 ", \"elapsed_s\": %.6f, \"cpu_s\": %.6f}\n", n, t1 - t0, cpu);
    free(data);
    free(iov);
    link_close(&l);
    return rc != 0;
}

static int cmd_drain(const opts *o) {
    bench_link l;
    int rc = link_open(o, NULL, o->name, &l);
    uint64_t n = 0;
    double c0 = cpu_s(), t_first = 0, t_end = 0;
    int copy = !strcmp(o->receive, "copy"), many = !strcmp(o->receive, "many");
    size_t cap = shimmy_channel_max_message(l.rx) * (many ? 2 : 1) + 64;
    uint8_t *buf = rc == 0 ? malloc(cap) : NULL;
    enum { MAXN = 256 };
    size_t lens[MAXN];
    while (rc == 0) {
        size_t len;
        int64_t got = 1;
        if (many) {
            got = shimmy_receive_many(l.sub, buf, cap, lens, NULL, MAXN, 10.0);
            rc = got < 0 ? (int)got : 0;
            len = got > 0 ? lens[got - 1] : 0;
        } else if (copy) {
            rc = shimmy_receive_copy(l.sub, buf, cap, &len, NULL, 10.0);
        } else {
            shimmy_message m;
            rc = shimmy_receive(l.sub, &m, 10.0);
            len = m.len;
        }
        if (rc < 0) {
            fail("receive", rc);
            break;
        }
        if (many) {   /* the end marker comes last, alone or at the end of a batch */
            int64_t k = 0;
            for (; k < got && lens[k] != 1; k++)
                if (lens[k] != 0 && n++ == 0)
                    t_first = now_s();
            if (k < got)
                break;
            continue;
        }
        if (len == 0)
            continue;
        if (len == 1)
            break;
        if (n++ == 0)
            t_first = now_s();
    }
    t_end = now_s();
    if (rc == 0)
        printf("{\"n\": %" PRIu64 ", \"elapsed_s\": %.6f, \"cpu_s\": %.6f}\n", n,
               t_end - t_first, cpu_s() - c0);
    free(buf);
    link_close(&l);
    return rc != 0;
}

static int parse_u64(const char *flag, const char *s, uint64_t *out) {
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    if (!*s || *end || s[0] == '-') {
        fprintf(stderr, "shimmy-c: %s needs a non-negative integer, got '%s'\n", flag, s);
        return 2;
    }
    *out = v;
    return 0;
}

int conform_main(int argc, char **argv);   /* tools/conform.c */

int main(int argc, char **argv) {
    if (argc >= 2 && !strncmp(argv[1], "conform-", 8))
        return conform_main(argc, argv);
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        fputs(USAGE, argc < 2 ? stderr : stdout);
        return argc < 2 ? 2 : 0;
    }
    const char *cmd = argv[1];
    opts o = {.receive = "view", .timeout = 30, .seconds = 1, .spin_us = -1};
    static const struct option longs[] = {
        {"daemon", 1, 0, 'd'}, {"count", 1, 0, 'n'}, {"size", 1, 0, 's'},
        {"mixed", 0, 0, 'x'}, {"first", 1, 0, 'f'}, {"start", 1, 0, 'S'},
        {"mode", 1, 0, 'm'}, {"capacity", 1, 0, 'c'}, {"max-publishers", 1, 0, 'P'},
        {"batch", 1, 0, 'b'}, {"loan", 0, 0, 'l'}, {"receive", 1, 0, 'r'},
        {"timeout", 1, 0, 't'}, {"ready", 1, 0, 'R'}, {"chunk", 1, 0, 'C'},
        {"linger", 1, 0, 'L'}, {"seconds", 1, 0, 'T'}, {"warmup", 1, 0, 'W'},
        {"spin-us", 1, 0, 'U'}, {"go-stdin", 0, 0, 'G'}, {"help", 0, 0, 'h'}, {0, 0, 0, 0}};
    optind = 2;
    int ch;
    uint64_t v;
    while ((ch = getopt_long(argc, argv, "h", longs, NULL)) != -1) {
        int e = 0;
        switch (ch) {
        case 'd': o.daemon = optarg; break;
        case 'n': e = parse_u64("--count", optarg, &o.count); break;
        case 's': e = parse_u64("--size", optarg, &o.size); break;
        case 'x': o.mixed = 1; break;
        case 'f': e = parse_u64("--first", optarg, &o.first); break;
        case 'S': o.start = optarg; break;
        case 'm': o.mode = optarg; break;
        case 'c': e = parse_u64("--capacity", optarg, &o.capacity); break;
        case 'P': e = parse_u64("--max-publishers", optarg, &v); o.max_publishers = (uint32_t)v;
                  break;
        case 'b': e = parse_u64("--batch", optarg, &o.batch); break;
        case 'l': o.loan = 1; break;
        case 'r': o.receive = optarg; break;
        case 't': o.timeout = atof(optarg); break;
        case 'R': o.ready = optarg; break;
        case 'C': e = parse_u64("--chunk", optarg, &o.chunk); break;
        case 'L': o.linger = atof(optarg); break;
        case 'T': o.seconds = atof(optarg); break;
        case 'W': e = parse_u64("--warmup", optarg, &o.warmup); break;
        case 'U': e = parse_u64("--spin-us", optarg, &v); o.spin_us = (int)v; break;
        case 'G': o.go_stdin = 1; break;
        case 'h': fputs(USAGE, stdout); return 0;
        default: fputs(USAGE, stderr); return 2;
        }
        if (e)
            return e;
    }
    if (optind != argc - 1) {
        fprintf(stderr, "shimmy-c %s: give exactly one NAME (see shimmy-c --help)\n", cmd);
        return 2;
    }
    o.name = argv[optind];
    if (o.start && strcmp(o.start, "oldest") && strcmp(o.start, "next")) {
        fprintf(stderr, "shimmy-c: --start must be oldest or next, got '%s'\n", o.start);
        return 2;
    }
    if (strcmp(o.receive, "view") && strcmp(o.receive, "copy") && strcmp(o.receive, "many")) {
        fprintf(stderr, "shimmy-c: --receive must be view, copy or many, got '%s'\n", o.receive);
        return 2;
    }
    if (o.mixed && o.size < 8) {
        fprintf(stderr, "shimmy-c: --mixed needs --size S >= 8 (the largest message)\n");
        return 2;
    }
    if (!strcmp(cmd, "pub"))
        return cmd_pub(&o);
    if (!strcmp(cmd, "sub"))
        return cmd_sub(&o);
    if (!strcmp(cmd, "stream-write"))
        return cmd_stream_write(&o);
    if (!strcmp(cmd, "stream-read"))
        return cmd_stream_read(&o);
    if (!strcmp(cmd, "echo"))
        return cmd_echo(&o);
    if (!strcmp(cmd, "ping"))
        return cmd_ping(&o);
    if (!strcmp(cmd, "blast"))
        return cmd_blast(&o);
    if (!strcmp(cmd, "drain"))
        return cmd_drain(&o);
    fprintf(stderr, "shimmy-c: unknown command '%s' (see shimmy-c --help)\n", cmd);
    return 2;
}
