/* Error codes and texts (shimmy/errors.py), names (shimmy/names.py), clocks and waits. */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <time.h>

#include "internal.h"

static _Thread_local char errbuf[1024];

static const char *const CODE_NAMES[] = {
    "ok", "error", "daemon_unavailable", "invalid_name", "invalid_argument",
    "message_too_large", "conflict", "not_found", "limit", "permission_denied",
    "backpressure_timeout", "timeout", "closed", "protocol", "stream_busy", "stream_broken",
    "publisher_busy", "ring_corrupted", "overwritten", "retired",
};
#define N_CODES (sizeof CODE_NAMES / sizeof CODE_NAMES[0])

const char *shimmy_errmsg(void) { return errbuf; }

const char *shimmy_code_name(int code) {
    if (code < 0)
        code = -code;
    return (size_t)code < N_CODES ? CODE_NAMES[code] : "error";
}

int shm_code_from_name(const char *name, size_t len) {
    for (size_t i = 1; i < N_CODES; i++)
        if (strlen(CODE_NAMES[i]) == len && memcmp(CODE_NAMES[i], name, len) == 0)
            return (int)i;
    return SHIMMY_E_ERROR;   /* unknown codes become ShimmyError, as error_from_reply does */
}

int shm_retired(const char *name) {
    /* ChannelRetired.of in shimmy/errors.py: the one text of every retired check */
    return shm_fail(SHIMMY_E_RETIRED, "channel '%s' was retired by the daemon (deleted, or the "
                    "daemon restarted); open it again", name);
}

int shm_fail(int code, const char *fmt, ...) {
    FORMAT_VARGS(errbuf, fmt);
    return -code;
}

void fmt_secs(char *out, size_t n, double s) {
    if (s == (double)(long long)s)
        snprintf(out, n, "%.1f", s);
    else
        snprintf(out, n, "%g", s);
}

/* shimmy/names.py: 1-200 characters, segments of [A-Za-z0-9._-] joined by '/'. */
#define NAME_RULE "1-200 characters: segments of [A-Za-z0-9._-] joined by '/', no empty, '.' " \
                  "or '..' segment"

int validate_name(const char *name) {
    if (name == NULL)
        return shm_fail(SHIMMY_E_INVALID_NAME, "channel name must be a str, got NULL; rule: %s",
                        NAME_RULE);
    size_t n = strlen(name);
    if (n < 1 || n > 200)
        return shm_fail(SHIMMY_E_INVALID_NAME, "channel name has %zu characters; rule: %s", n,
                        NAME_RULE);
    const char *seg = name;
    for (;;) {
        const char *end = strchr(seg, '/');
        size_t len = end ? (size_t)(end - seg) : strlen(seg);
        int ok = len > 0 && !(len == 1 && seg[0] == '.') &&
                 !(len == 2 && seg[0] == '.' && seg[1] == '.');
        for (size_t i = 0; ok && i < len; i++) {
            char ch = seg[i];
            ok = (ch >= 'a' && ch <= 'z') || (ch >= 'A' && ch <= 'Z') ||
                 (ch >= '0' && ch <= '9') || ch == '.' || ch == '_' || ch == '-';
        }
        if (!ok)
            return shm_fail(SHIMMY_E_INVALID_NAME,
                            "channel name '%s' has a bad segment '%.*s'; rule: %s", name,
                            (int)len, seg, NAME_RULE);
        if (end == NULL)
            return 0;
        seg = end + 1;
    }
}

double mono_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* The store-load fence of the wake-up handshake (Dekker pair): ring.fence() in Python. */
void full_fence(void) { atomic_thread_fence(memory_order_seq_cst); }

int sem_wait_for(sem_t *sem, double seconds) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);   /* sem_timedwait's clock */
    if (seconds < 0)
        seconds = 0;
    long long ns = (long long)ts.tv_nsec + (long long)(seconds * 1e9);
    ts.tv_sec += (time_t)(ns / 1000000000LL);
    ts.tv_nsec = (long)(ns % 1000000000LL);
    for (;;) {
        if (sem_timedwait(sem, &ts) == 0)
            return 1;
        if (errno != EINTR)
            return 0;
    }
}
