/* The connection to the node daemon (sdk/client.py): control protocol v2 (spec/control.md:
 * each request and reply one frame, a 4-byte little-endian length then one msgpack map, over a
 * unix stream socket), the session socket (token line, then one heartbeat byte per
 * heartbeat_interval, from a thread of this library) and the daemon's error replies. */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "internal.h"

#define REQUEST_TIMEOUT 5.0      /* seconds to wait for a reply before DaemonUnavailable */
#define REPLACED_CHECK_MS 100    /* while waiting, how often to check the daemon was replaced */
#define REPLY_MAX (64u << 20)    /* a larger reply frame is a protocol error (stat of a busy
                                    daemon is the largest, well under this) */
#define DEFAULT_SOCKET "/run/shimmy/shimmyd.sock"

struct shimmy_client {
    char path[PATH_MAX];
    int fd;                 /* control connection */
    int session;            /* session socket */
    pthread_mutex_t lock;   /* one request at a time on fd */
    uint64_t next_id;
    int64_t id;
    char token[80];
    double heartbeat_interval;
    pthread_t beat;
    int beat_started;
    int stop[2];            /* a pipe: written to stop the heartbeat thread */
    atomic_int closed;      /* the daemon went away (session EOF) */
    ino_t ino;              /* which socket file we connected to */
    struct timespec mtime;
};

static int unavailable(const char *path, const char *fmt, ...) {
    char why[512];
    FORMAT_VARGS(why, fmt);
    return shm_fail(SHIMMY_E_DAEMON_UNAVAILABLE,
                    "shimmy daemon not reachable at %s (%s); start one with `shimmy daemon "
                    "--socket %s` or point $SHIMMY_DAEMON at its socket", path, why, path);
}

int client_closed(shimmy_client *c) { return atomic_load(&c->closed); }

/* ---- msgpack helpers --------------------------------------------------------------------- */

const msgpack_object *mp_get(const msgpack_object *map, const char *key) {
    if (map == NULL || map->type != MSGPACK_OBJECT_MAP)
        return NULL;
    size_t n = strlen(key);
    for (uint32_t i = 0; i < map->via.map.size; i++) {
        const msgpack_object_kv *kv = &map->via.map.ptr[i];
        if (kv->key.type == MSGPACK_OBJECT_STR && kv->key.via.str.size == n &&
            memcmp(kv->key.via.str.ptr, key, n) == 0)
            return &kv->val;
    }
    return NULL;
}

int mp_int(const msgpack_object *map, const char *key, int64_t *out) {
    const msgpack_object *o = mp_get(map, key);
    if (o != NULL && o->type == MSGPACK_OBJECT_POSITIVE_INTEGER && o->via.u64 <= INT64_MAX) {
        *out = (int64_t)o->via.u64;
        return 0;
    }
    if (o != NULL && o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER) {
        *out = o->via.i64;
        return 0;
    }
    return shm_fail(SHIMMY_E_PROTOCOL, "daemon reply lacks the integer field '%s'", key);
}

int mp_double(const msgpack_object *map, const char *key, double *out) {
    const msgpack_object *o = mp_get(map, key);
    if (o != NULL && (o->type == MSGPACK_OBJECT_FLOAT64 || o->type == MSGPACK_OBJECT_FLOAT32)) {
        *out = o->via.f64;
        return 0;
    }
    int64_t i;
    if (mp_int(map, key, &i) == 0) {
        *out = (double)i;
        return 0;
    }
    return shm_fail(SHIMMY_E_PROTOCOL, "daemon reply lacks the number field '%s'", key);
}

int mp_str(const msgpack_object *map, const char *key, char *out, size_t cap) {
    const msgpack_object *o = mp_get(map, key);
    if (o == NULL || o->type != MSGPACK_OBJECT_STR || o->via.str.size >= cap)
        return shm_fail(SHIMMY_E_PROTOCOL, "daemon reply lacks the string field '%s' (or it "
                        "is longer than %zu bytes)", key, cap - 1);
    memcpy(out, o->via.str.ptr, o->via.str.size);
    out[o->via.str.size] = 0;
    return 0;
}

void reply_free(ctl_reply *reply) {
    msgpack_unpacked_destroy(&reply->u);
    free(reply->buf);
    reply->buf = NULL;
    reply->map = NULL;
}

static void pack_str(msgpack_packer *pk, const char *s) {
    size_t n = strlen(s);
    msgpack_pack_str(pk, n);
    msgpack_pack_str_body(pk, s, n);
}

/* ---- framing ----------------------------------------------------------------------------- */

static int write_all(int fd, const void *buf, size_t n) {
    const char *p = buf;
    while (n) {
        ssize_t k = send(fd, p, n, MSG_NOSIGNAL);
        if (k < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

static int replaced(shimmy_client *c) {
    struct stat st;
    if (stat(c->path, &st) < 0)
        return 1;
    return st.st_ino != c->ino || st.st_mtim.tv_sec != c->mtime.tv_sec ||
           st.st_mtim.tv_nsec != c->mtime.tv_nsec;
}

/* Read exactly n bytes by the deadline; 0 done, -1 error (text set), naming the op. */
static int read_all(shimmy_client *c, void *buf, size_t n, double deadline, const char *op) {
    char *p = buf;
    while (n) {
        struct pollfd pfd = {c->fd, POLLIN, 0};
        int r = poll(&pfd, 1, REPLACED_CHECK_MS);
        if (r < 0 && errno == EINTR)
            continue;
        if (r == 0) {
            if (replaced(c))
                return unavailable(c->path, "the daemon went away before it answered '%s'", op);
            if (mono_now() >= deadline)
                return unavailable(c->path, "no reply to '%s' within %g s", op, REQUEST_TIMEOUT);
            continue;
        }
        ssize_t k = recv(c->fd, p, n, 0);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return unavailable(c->path, "the daemon went away before it answered '%s'", op);
        p += k;
        n -= (size_t)k;
    }
    return 0;
}

/* One request frame out, its reply frame in (replies to earlier, abandoned requests skipped:
 * a connection that timed out is dropped, so none are pending in practice). */
int ctl_request(shimmy_client *c, const char *op, ctl_reply *reply, ...) {
    va_list ap, count;
    size_t fields = 0;
    va_start(ap, reply);
    va_copy(count, ap);
    for (const char *spec; (spec = va_arg(count, const char *)) != NULL;) {
        if (spec[0] == 's') {
            if (va_arg(count, const char *) != NULL)
                fields++;
        } else if (spec[0] == 'i' || spec[0] == 'o') {
            if (va_arg(count, int64_t) != 0 || spec[0] == 'i')
                fields++;
        } else {
            (void)va_arg(count, int);
            fields++;
        }
    }
    va_end(count);
    int hello = strcmp(op, "hello") == 0;
    msgpack_sbuffer sb;
    msgpack_sbuffer_init(&sb);
    msgpack_packer pk;
    msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
    char frame_len[4] = {0};
    msgpack_sbuffer_write(&sb, frame_len, 4);   /* the length, filled in below */
    pthread_mutex_lock(&c->lock);
    uint64_t id = ++c->next_id;
    msgpack_pack_map(&pk, 3 + fields + (hello ? 0 : 2));
    pack_str(&pk, "v");
    msgpack_pack_int(&pk, SHIMMY_PROTOCOL_VERSION);
    pack_str(&pk, "id");
    msgpack_pack_uint64(&pk, id);
    pack_str(&pk, "op");
    pack_str(&pk, op);
    if (!hello) {
        pack_str(&pk, "client");
        msgpack_pack_int64(&pk, c->id);
        pack_str(&pk, "token");
        pack_str(&pk, c->token);
    }
    for (const char *spec; (spec = va_arg(ap, const char *)) != NULL;) {
        const char *key = spec + 2;
        if (spec[0] == 's') {
            const char *v = va_arg(ap, const char *);
            if (v == NULL)
                continue;
            pack_str(&pk, key);
            pack_str(&pk, v);
        } else if (spec[0] == 'i' || spec[0] == 'o') {
            int64_t v = va_arg(ap, int64_t);
            if (v == 0 && spec[0] == 'o')
                continue;
            pack_str(&pk, key);
            msgpack_pack_int64(&pk, v);
        } else {
            int v = va_arg(ap, int);
            pack_str(&pk, key);
            if (v)
                msgpack_pack_true(&pk);
            else
                msgpack_pack_false(&pk);
        }
    }
    va_end(ap);
    uint32_t body = (uint32_t)(sb.size - 4);
    for (int i = 0; i < 4; i++)
        sb.data[i] = (char)((body >> (8 * i)) & 0xff);   /* little-endian length */
    int rc;
    char *buf = NULL;
    msgpack_unpacked_init(&reply->u);
    reply->map = NULL;
    reply->buf = NULL;
    if (client_closed(c) && !hello) {
        rc = unavailable(c->path, "this client's connection to the daemon was lost; connect "
                         "again");
        goto out;
    }
    if (write_all(c->fd, sb.data, sb.size) < 0) {
        rc = unavailable(c->path, "sending '%s': %s", op, strerror(errno));
        goto out;
    }
    double deadline = mono_now() + REQUEST_TIMEOUT;
    for (;;) {
        unsigned char hdr[4];
        if ((rc = read_all(c, hdr, 4, deadline, op)) < 0)
            goto out;
        uint32_t n = hdr[0] | (uint32_t)hdr[1] << 8 | (uint32_t)hdr[2] << 16 |
                     (uint32_t)hdr[3] << 24;
        if (n == 0 || n > REPLY_MAX) {
            rc = shm_fail(SHIMMY_E_PROTOCOL, "daemon reply frame of %u bytes (a frame holds 1 to "
                          "%u bytes)", n, REPLY_MAX);
            goto out;
        }
        free(buf);
        buf = malloc(n);
        if (buf == NULL) {
            rc = shm_fail(SHIMMY_E_LIMIT, "out of memory for a %u-byte reply", n);
            goto out;
        }
        if ((rc = read_all(c, buf, n, deadline, op)) < 0)
            goto out;
        msgpack_unpacked_destroy(&reply->u);
        msgpack_unpacked_init(&reply->u);
        size_t off = 0;
        if (msgpack_unpack_next(&reply->u, buf, n, &off) != MSGPACK_UNPACK_SUCCESS ||
            off != n || reply->u.data.type != MSGPACK_OBJECT_MAP) {
            rc = shm_fail(SHIMMY_E_PROTOCOL, "daemon reply to '%s' is not one msgpack map", op);
            goto out;
        }
        /* our reply, or one the daemon could not tie to a request ("id": null: a frame it
         * refused; it closes the connection after it) */
        const msgpack_object *rid = mp_get(&reply->u.data, "id");
        if (rid == NULL || rid->type == MSGPACK_OBJECT_NIL ||
            (rid->type == MSGPACK_OBJECT_POSITIVE_INTEGER && rid->via.u64 == id))
            break;
    }
    reply->map = &reply->u.data;
    int64_t v;
    if (mp_int(reply->map, "v", &v) < 0 || v != SHIMMY_PROTOCOL_VERSION) {
        rc = shm_fail(SHIMMY_E_PROTOCOL, "daemon speaks protocol %lld, this library %d",
                      mp_int(reply->map, "v", &v) < 0 ? -1LL : (long long)v,
                      SHIMMY_PROTOCOL_VERSION);
        goto out;
    }
    const msgpack_object *ok = mp_get(reply->map, "ok");
    if (ok == NULL || ok->type != MSGPACK_OBJECT_BOOLEAN || !ok->via.boolean) {
        const msgpack_object *err = mp_get(reply->map, "error");
        const msgpack_object *code = mp_get(err, "code"), *msg = mp_get(err, "message");
        int cd = code != NULL && code->type == MSGPACK_OBJECT_STR
                     ? shm_code_from_name(code->via.str.ptr, code->via.str.size)
                     : SHIMMY_E_ERROR;
        if (msg != NULL && msg->type == MSGPACK_OBJECT_STR)
            rc = shm_fail(cd, "%.*s", (int)msg->via.str.size, msg->via.str.ptr);
        else
            rc = shm_fail(cd, "unknown error");
        goto out;
    }
    rc = 0;
out:
    if (rc == -SHIMMY_E_DAEMON_UNAVAILABLE || rc == -SHIMMY_E_PROTOCOL) {
        /* a reply may be half read: the framing of this connection is lost, and so is the
         * daemon for this client (sdk/client.py drops its socket the same way); connect anew */
        shutdown(c->fd, SHUT_RDWR);
        atomic_store(&c->closed, 1);
    }
    pthread_mutex_unlock(&c->lock);
    reply->buf = buf;   /* the unpacked strings point into it */
    msgpack_sbuffer_destroy(&sb);
    if (rc < 0)
        reply_free(reply);
    return rc;
}

/* ---- the session and its heartbeat ------------------------------------------------------- */

/* One byte per interval; EOF from the daemon marks the client closed (sdk/client.py
 * _heartbeat). */
static void *heartbeat(void *arg) {
    shimmy_client *c = arg;
    int ms = (int)(c->heartbeat_interval * 1000);
    for (;;) {
        struct pollfd pfd[2] = {{c->session, POLLIN, 0}, {c->stop[0], POLLIN, 0}};
        int r = poll(pfd, 2, ms);
        if (r < 0 && errno == EINTR)
            continue;
        if (pfd[1].revents)
            return NULL;
        if (pfd[0].revents) {
            char junk[64];
            if (recv(c->session, junk, sizeof junk, MSG_DONTWAIT) == 0 ||
                (pfd[0].revents & (POLLHUP | POLLERR))) {
                atomic_store(&c->closed, 1);
                return NULL;
            }
        }
        if (send(c->session, "h", 1, MSG_NOSIGNAL) < 0) {
            atomic_store(&c->closed, 1);
            return NULL;
        }
    }
}

static int connect_unix(const char *path, int *fd_out) {
    struct sockaddr_un addr = {.sun_family = AF_UNIX};
    if (strlen(path) >= sizeof addr.sun_path) {
        errno = ENAMETOOLONG;
        return -1;
    }
    strcpy(addr.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0)
        return -1;
    if (connect(fd, (struct sockaddr *)&addr, sizeof addr) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    *fd_out = fd;
    return 0;
}

static void client_free(shimmy_client *c) {
    if (c->beat_started) {
        if (write(c->stop[1], "x", 1) < 0) { /* the thread also stops at the session's EOF */ }
        pthread_join(c->beat, NULL);
    }
    if (c->stop[0] >= 0) {
        close(c->stop[0]);
        close(c->stop[1]);
    }
    if (c->session >= 0)
        close(c->session);
    if (c->fd >= 0)
        close(c->fd);
    pthread_mutex_destroy(&c->lock);
    free(c);
}

int shimmy_connect(const char *socket_path, shimmy_client **out) {
    *out = NULL;
    const char *path = socket_path ? socket_path : getenv("SHIMMY_DAEMON");
    if (path == NULL || !*path)
        path = DEFAULT_SOCKET;
    shimmy_client *c = calloc(1, sizeof *c);
    if (c == NULL)
        return shm_fail(SHIMMY_E_LIMIT, "out of memory");
    c->fd = c->session = c->stop[0] = c->stop[1] = -1;
    pthread_mutex_init(&c->lock, NULL);
    /* protocol.resolve_socket: an absolute path */
    if (path[0] != '/') {
        char cwd[PATH_MAX];
        if (getcwd(cwd, sizeof cwd) == NULL)
            cwd[0] = 0;
        if (strlen(cwd) + 1 + strlen(path) >= sizeof c->path) {
            client_free(c);
            return unavailable(path, "the socket path is longer than %d bytes", PATH_MAX - 1);
        }
        strcat(strcat(strcpy(c->path, cwd), "/"), path);
    } else {
        snprintf(c->path, sizeof c->path, "%s", path);
    }
    int rc;
    struct stat st;
    if (stat(c->path, &st) < 0) {
        rc = errno == EACCES ? shm_fail(SHIMMY_E_PERMISSION_DENIED, "cannot open the daemon's "
                                        "socket directory of %s as uid %u (docs/security.md)",
                                        c->path, (unsigned)geteuid())
                             : unavailable(c->path, "no socket file there");
        goto fail;
    }
    c->ino = st.st_ino;
    c->mtime = st.st_mtim;
    if (connect_unix(c->path, &c->fd) < 0) {
        rc = errno == EACCES ? shm_fail(SHIMMY_E_PERMISSION_DENIED, "cannot open the daemon's "
                                        "control socket %s as uid %u (docs/security.md)",
                                        c->path, (unsigned)geteuid())
                             : unavailable(c->path, "%s", errno == ECONNREFUSED
                                           ? "nobody listens on the socket" : strerror(errno));
        goto fail;
    }
    ctl_reply r;
    if ((rc = ctl_request(c, "hello", &r, "i:pid", (int64_t)getpid(), NULL)) < 0)
        goto fail;
    char session[PATH_MAX];
    if ((rc = mp_int(r.map, "client", &c->id)) < 0 ||
        (rc = mp_str(r.map, "token", c->token, sizeof c->token)) < 0 ||
        (rc = mp_str(r.map, "session", session, sizeof session)) < 0 ||
        (rc = mp_double(r.map, "heartbeat_interval", &c->heartbeat_interval)) < 0) {
        reply_free(&r);
        goto fail;
    }
    reply_free(&r);
    if (connect_unix(session, &c->session) < 0) {
        rc = unavailable(c->path, "session socket %s: %s", session, strerror(errno));
        goto fail;
    }
    char line[96];
    int n = snprintf(line, sizeof line, "%s\n", c->token);
    if (write_all(c->session, line, (size_t)n) < 0) {
        rc = unavailable(c->path, "session socket: %s", strerror(errno));
        goto fail;
    }
    if (pipe2(c->stop, O_CLOEXEC) < 0) {
        rc = shm_fail(SHIMMY_E_LIMIT, "cannot make a pipe: %s", strerror(errno));
        goto fail;
    }
    if (pthread_create(&c->beat, NULL, heartbeat, c) != 0) {
        rc = shm_fail(SHIMMY_E_LIMIT, "cannot start the heartbeat thread");
        goto fail;
    }
    c->beat_started = 1;
    *out = c;
    return 0;
fail:
    client_free(c);
    return rc;
}

void shimmy_disconnect(shimmy_client *c) {
    if (c == NULL)
        return;
    if (c->beat_started) {
        if (write(c->stop[1], "x", 1) < 0) { /* see client_free */ }
        pthread_join(c->beat, NULL);
        c->beat_started = 0;
    }
    if (c->session >= 0)
        send(c->session, "q", 1, MSG_NOSIGNAL);   /* a clean exit in the daemon's counters */
    client_free(c);
}
