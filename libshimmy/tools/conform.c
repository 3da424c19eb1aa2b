/* shimmy-c's conformance commands: the command contract of spec/vectors/README.md
 * (conform-read, conform-point, conform-write, conform-frames), so that the runner checks
 * libshimmy's ring, stream and control-frame code against the frozen vectors.  Images are
 * mapped shared and writable, as /dev/shm objects are; the paths are libshimmy's own (ring.c,
 * stream.c, msgpack-c for frames), without a daemon.  JSON comes from jansson. */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "internal.h"

#define NO_SEMAPHORE "/shimmy-conform-no-such-semaphore.s"   /* wake-ups find none: skipped */

static void emit(json_t *line) {
    char *text = json_dumps(line, JSON_COMPACT);
    puts(text);
    free(text);
    json_decref(line);
}

static json_t *error_line(int rc) {
    return json_pack("{s:s, s:s}", "error", shimmy_code_name(rc), "message", shimmy_errmsg());
}

static json_t *hex(const uint8_t *p, size_t n) {
    static const char digits[] = "0123456789abcdef";
    char *s = malloc(2 * n + 1);
    for (size_t i = 0; i < n; i++) {
        s[2 * i] = digits[p[i] >> 4];
        s[2 * i + 1] = digits[p[i] & 15];
    }
    s[2 * n] = 0;
    json_t *out = json_string(s);
    free(s);
    return out;
}

static int unhex(const char *s, uint8_t **out, size_t *n) {
    size_t len = strlen(s);
    if (len % 2)
        return -1;
    *n = len / 2;
    *out = malloc(*n ? *n : 1);
    for (size_t i = 0; i < *n; i++) {
        unsigned v;
        if (sscanf(s + 2 * i, "%2x", &v) != 1) {
            free(*out);
            return -1;
        }
        (*out)[i] = (uint8_t)v;
    }
    return 0;
}

static int usage(const char *what) {
    fprintf(stderr, "shimmy-c: %s (see spec/vectors/README.md, \"The command contract\")\n", what);
    return 2;
}

typedef struct {
    uint8_t *mem;
    size_t size;
} mapping;

static int map_file(const char *path, mapping *m) {
    int fd = open(path, O_RDWR);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) < 0) {
        fprintf(stderr, "shimmy-c: cannot open %s: %s\n", path, strerror(errno));
        return 2;
    }
    m->size = (size_t)st.st_size;
    m->mem = m->size ? mmap(NULL, m->size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0) : NULL;
    close(fd);
    if (m->mem == MAP_FAILED || m->mem == NULL) {
        fprintf(stderr, "shimmy-c: cannot map %s\n", path);
        return 2;
    }
    return 0;
}

static void unmap(mapping *m) {
    msync(m->mem, m->size, MS_SYNC);
    munmap(m->mem, m->size);
}

static int parse_point(const char *s, uint64_t *pos, uint64_t *seq) {
    char *end;
    *pos = strtoull(s, &end, 10);
    if (*end != ':')
        return -1;
    *seq = strtoull(end + 1, &end, 10);
    return *end ? -1 : 0;
}

/* Every message from the reader's position; lines tagged with `publisher` when >= 0.
 * Returns 0 when the read ended empty, 1 after an error line. */
static int read_ring(ring_reader *r, int64_t publisher) {
    uint64_t cap = r->seg->max_message;
    uint8_t *buf = malloc(cap ? cap : 1);
    int rc, ended = 0;
    for (;;) {
        uint64_t before = r->lost_total, len, seq;
        rc = reader_take_copy(r, buf, cap, &len, &seq, 1);
        if (rc <= 0)
            break;
        json_t *line;
        if (r->lost_total != before) {
            line = json_pack("{s:I}", "lost", (json_int_t)(r->lost_total - before));
            if (publisher >= 0)
                json_object_set_new(line, "publisher", json_integer(publisher));
            emit(line);
        }
        line = json_pack("{s:I, s:o}", "seq", (json_int_t)seq, "data", hex(buf, len));
        if (publisher >= 0)
            json_object_set_new(line, "publisher", json_integer(publisher));
        emit(line);
    }
    free(buf);
    if (rc < 0) {
        emit(error_line(rc));
        ended = 1;
    } else {
        reader_release_to(r, r->position);
    }
    return ended;
}

static int cmd_read(const char *kind, const char *image, const char *start, int64_t slot,
                    char **members, int n_members) {
    mapping m;
    int e = map_file(image, &m);
    if (e)
        return e;
    shm_seg seg;
    int rc = seg_check(&seg, m.mem, m.size, kind[0] == 's' ? 's' : 'r');
    if (rc < 0) {
        emit(error_line(rc));
        unmap(&m);
        return 0;
    }
    if (!strcmp(kind, "stream")) {
        shimmy_stream *s = stream_attach(&seg, SHIMMY_READER, &rc);
        if (s == NULL) {
            emit(error_line(rc));
        } else {
            uint8_t buf[65536];
            for (;;) {
                int64_t n = shimmy_stream_read(s, buf, sizeof buf, 0);
                if (n > 0) {
                    emit(json_pack("{s:o}", "data", hex(buf, (size_t)n)));
                    continue;
                }
                if (n == 0)
                    emit(json_pack("{s:s}", "end", "eof"));
                else if (n == -SHIMMY_E_TIMEOUT)
                    emit(json_pack("{s:s}", "end", "empty"));
                else
                    emit(error_line((int)n));
                break;
            }
            stream_detach(s);
        }
        unmap(&m);
        return 0;
    }
    if (slot < 0 || (uint64_t)slot >= seg.max_subs) {
        unmap(&m);
        return usage("--slot must name a slot of the ring's table");
    }
    if (!strcmp(kind, "ring")) {
        uint64_t pos, seq;
        if (start == NULL || parse_point(start, &pos, &seq) < 0) {
            unmap(&m);
            return usage("--start POS:SEQ is needed");
        }
        ring_reader r;
        reader_init(&r, &seg, (uint32_t)slot, pos, seq, NULL);
        if (!read_ring(&r, -1))
            emit(json_pack("{s:s}", "end", "empty"));
        unmap(&m);
        return 0;
    }
    /* a group: the channel ring's epoch, then every member's messages */
    const uint32_t *epoch_word = (const uint32_t *)(seg.mem + OFF_GROUP_EPOCH);
    uint32_t epoch = ld32_rlx(epoch_word);
    emit(json_pack("{s:I}", "group_epoch", (json_int_t)epoch));
    int failed = 0;
    for (int i = 0; i < n_members && !failed; i++) {
        char *spec = members[i], *eq = strchr(spec, '='), *at = strrchr(spec, '@');
        uint64_t pos, seq;
        if (eq == NULL || at == NULL || at < eq || parse_point(at + 1, &pos, &seq) < 0) {
            unmap(&m);
            return usage("--member ID=FILE@POS:SEQ");
        }
        *at = 0;
        mapping mm;
        if ((e = map_file(eq + 1, &mm)) != 0) {
            unmap(&m);
            return e;
        }
        shm_seg ms;
        if ((rc = seg_check(&ms, mm.mem, mm.size, 'r')) < 0) {
            emit(error_line(rc));
            failed = 1;
        } else {
            ring_reader r;
            reader_init(&r, &ms, (uint32_t)slot, pos, seq, NULL);
            r.group = epoch_word;
            r.group_epoch = epoch;
            r.publisher = (uint32_t)strtoul(spec, NULL, 10);
            failed = read_ring(&r, (int64_t)r.publisher);
        }
        unmap(&mm);
    }
    if (!failed)
        emit(json_pack("{s:s}", "end", "empty"));
    unmap(&m);
    return 0;
}

static int cmd_point(const char *image, int oldest) {
    mapping m;
    int e = map_file(image, &m);
    if (e)
        return e;
    shm_seg seg;
    uint64_t pos, seq;
    int rc = seg_check(&seg, m.mem, m.size, 'r');
    if (rc == 0)
        rc = oldest ? stream_point_oldest(&seg, &pos, &seq) : stream_point_tail(&seg, &pos, &seq);
    if (rc < 0)
        emit(error_line(rc));
    else
        emit(json_pack("{s:I, s:I}", "position", (json_int_t)pos, "seq", (json_int_t)seq));
    unmap(&m);
    return 0;
}

static double op_timeout(json_t *op) {
    json_t *t = json_object_get(op, "timeout");
    return json_is_number(t) ? json_number_value(t) : 0;
}

static int write_ring(shm_seg *seg, json_t *ops) {
    wakeups wk;
    ring_writer w;
    int rc = wakeups_init(&wk, seg, NO_SEMAPHORE);
    if (rc == 0)
        rc = writer_init(&w, seg, &wk, NULL);
    if (rc < 0) {
        emit(error_line(rc));
        wakeups_close(&wk);
        return 0;
    }
    emit(json_pack("{s:I}", "next_seq", (json_int_t)w.seq));
    size_t i;
    json_t *op;
    json_array_foreach(ops, i, op) {
        const char *name = json_string_value(json_object_get(op, "op"));
        uint8_t *data = NULL;
        size_t n = 0;
        const char *text = json_string_value(json_object_get(op, "data"));
        if (text != NULL && unhex(text, &data, &n) < 0)
            return usage("an op's data is not hex");
        if (name != NULL && !strcmp(name, "publish")) {
            uint64_t seq;
            rc = writer_publish(&w, data, n, op_timeout(op), &seq);
            emit(rc < 0 ? error_line(rc) : json_pack("{s:I}", "seq", (json_int_t)seq));
        } else if (name != NULL && !strcmp(name, "loan")) {
            json_int_t size = json_integer_value(json_object_get(op, "size"));
            void *buf;
            rc = writer_claim(&w, (uint64_t)size, op_timeout(op), &buf);
            if (rc < 0) {
                emit(error_line(rc));
            } else {
                memcpy(buf, data, n < (size_t)size ? n : (size_t)size);
                emit(json_pack("{s:I}", "seq", (json_int_t)writer_commit_claim(&w, (uint64_t)size)));
            }
        } else if (name != NULL && !strcmp(name, "publish_many")) {
            json_t *items = json_object_get(op, "items");
            size_t count = json_array_size(items), published = 0;
            struct iovec *iov = calloc(count ? count : 1, sizeof *iov);
            json_t *item;
            size_t k;
            json_array_foreach(items, k, item) {
                uint8_t *p;
                size_t len;
                if (unhex(json_string_value(item) ? json_string_value(item) : "x", &p, &len) < 0)
                    return usage("a batch item is not hex");
                iov[k].iov_base = p;
                iov[k].iov_len = len;
            }
            int64_t got = writer_publish_many(&w, iov, count, op_timeout(op), &published);
            if (got < 0) {
                json_t *line = error_line((int)got);
                json_object_set_new(line, "published", json_integer((json_int_t)published));
                emit(line);
            } else {
                emit(json_pack("{s:I}", "published", (json_int_t)got));
            }
            for (k = 0; k < count; k++)
                free(iov[k].iov_base);
            free(iov);
        } else {
            free(data);
            return usage("unknown ring op");
        }
        free(data);
    }
    wakeups_close(&wk);
    return 0;
}

static int write_stream(shm_seg *seg, json_t *ops) {
    int rc;
    shimmy_stream *s = stream_attach(seg, SHIMMY_WRITER, &rc);
    if (s == NULL) {
        emit(error_line(rc));
        return 0;
    }
    size_t i;
    json_t *op;
    json_array_foreach(ops, i, op) {
        const char *name = json_string_value(json_object_get(op, "op"));
        if (name != NULL && !strcmp(name, "write")) {
            uint8_t *data;
            size_t n;
            const char *text = json_string_value(json_object_get(op, "data"));
            if (text == NULL || unhex(text, &data, &n) < 0)
                return usage("a write's data is not hex");
            int64_t k = stream_write_nowait(s, data, n);
            emit(k < 0 ? error_line((int)k) : json_pack("{s:I}", "written", (json_int_t)k));
            free(data);
        } else if (name != NULL && !strcmp(name, "close")) {
            stream_finish(s);
            emit(json_pack("{s:b}", "closed", 1));
        } else {
            return usage("unknown stream op");
        }
    }
    stream_detach(s);
    return 0;
}

static int cmd_write(const char *kind, const char *image, const char *ops_path) {
    json_error_t jerr;
    json_t *ops = ops_path ? json_load_file(ops_path, 0, &jerr) : NULL;
    if (!json_is_array(ops))
        return usage("--ops FILE must hold a JSON list of ops");
    mapping m;
    int e = map_file(image, &m);
    if (e)
        return e;
    shm_seg seg;
    int rc = seg_check(&seg, m.mem, m.size, !strcmp(kind, "stream") ? 's' : 'r');
    if (rc < 0)
        emit(error_line(rc));
    else
        e = !strcmp(kind, "stream") ? write_stream(&seg, ops) : write_ring(&seg, ops);
    unmap(&m);
    json_decref(ops);
    return e;
}

/* ---- control frames: JSON <-> msgpack through msgpack-c ---------------------------------- */

static void pack_json(msgpack_packer *pk, json_t *v) {
    switch (json_typeof(v)) {
    case JSON_OBJECT: {
        msgpack_pack_map(pk, json_object_size(v));
        const char *key;
        json_t *val;
        json_object_foreach(v, key, val) {
            msgpack_pack_str(pk, strlen(key));
            msgpack_pack_str_body(pk, key, strlen(key));
            pack_json(pk, val);
        }
        break;
    }
    case JSON_ARRAY: {
        msgpack_pack_array(pk, json_array_size(v));
        size_t i;
        json_t *val;
        json_array_foreach(v, i, val)
            pack_json(pk, val);
        break;
    }
    case JSON_STRING:
        msgpack_pack_str(pk, json_string_length(v));
        msgpack_pack_str_body(pk, json_string_value(v), json_string_length(v));
        break;
    case JSON_INTEGER:
        msgpack_pack_int64(pk, json_integer_value(v));
        break;
    case JSON_REAL:
        msgpack_pack_double(pk, json_real_value(v));
        break;
    case JSON_TRUE:
        msgpack_pack_true(pk);
        break;
    case JSON_FALSE:
        msgpack_pack_false(pk);
        break;
    default:
        msgpack_pack_nil(pk);
    }
}

static json_t *to_json(const msgpack_object *o) {
    switch (o->type) {
    case MSGPACK_OBJECT_NIL:
        return json_null();
    case MSGPACK_OBJECT_BOOLEAN:
        return json_boolean(o->via.boolean);
    case MSGPACK_OBJECT_POSITIVE_INTEGER:
        return o->via.u64 <= INT64_MAX ? json_integer((json_int_t)o->via.u64)
                                       : json_real((double)o->via.u64);
    case MSGPACK_OBJECT_NEGATIVE_INTEGER:
        return json_integer(o->via.i64);
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64:
        return json_real(o->via.f64);
    case MSGPACK_OBJECT_STR:
        return json_stringn(o->via.str.ptr, o->via.str.size);
    case MSGPACK_OBJECT_BIN:
        return hex((const uint8_t *)o->via.bin.ptr, o->via.bin.size);
    case MSGPACK_OBJECT_ARRAY: {
        json_t *a = json_array();
        for (uint32_t i = 0; i < o->via.array.size; i++)
            json_array_append_new(a, to_json(&o->via.array.ptr[i]));
        return a;
    }
    case MSGPACK_OBJECT_MAP: {
        json_t *m = json_object();
        for (uint32_t i = 0; i < o->via.map.size; i++) {
            const msgpack_object *k = &o->via.map.ptr[i].key;
            char key[256];
            if (k->type == MSGPACK_OBJECT_STR)
                snprintf(key, sizeof key, "%.*s", (int)k->via.str.size, k->via.str.ptr);
            else
                snprintf(key, sizeof key, "<key of type %d>", (int)k->type);
            json_object_set_new(m, key, to_json(&o->via.map.ptr[i].val));
        }
        return m;
    }
    default:
        return json_null();
    }
}

static int cmd_frames(const char *encode, const char *decode) {
    if (encode != NULL) {
        json_error_t jerr;
        json_t *reqs = json_load_file(encode, 0, &jerr);
        if (!json_is_array(reqs))
            return usage("--encode FILE must hold a JSON list of request maps");
        size_t i;
        json_t *req;
        json_array_foreach(reqs, i, req) {
            msgpack_sbuffer sb;
            msgpack_sbuffer_init(&sb);
            msgpack_packer pk;
            msgpack_packer_init(&pk, &sb, msgpack_sbuffer_write);
            char len[4] = {0};
            msgpack_sbuffer_write(&sb, len, 4);
            pack_json(&pk, req);
            uint32_t body = (uint32_t)(sb.size - 4);
            for (int k = 0; k < 4; k++)
                sb.data[k] = (char)((body >> (8 * k)) & 0xff);
            emit(json_pack("{s:o}", "frame", hex((const uint8_t *)sb.data, sb.size)));
            msgpack_sbuffer_destroy(&sb);
        }
        json_decref(reqs);
        return 0;
    }
    FILE *f = fopen(decode, "rb");
    if (f == NULL)
        return usage("--decode FILE cannot be read");
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    uint8_t *buf = malloc(size > 0 ? (size_t)size : 1);
    size_t got = fread(buf, 1, (size_t)size, f);
    fclose(f);
    size_t at = 0;
    while (at < got) {
        if (got - at < 4) {
            emit(json_pack("{s:s, s:s}", "error", "protocol", "message",
                           "a reply frame's 4-byte length is cut short"));
            break;
        }
        uint32_t n = buf[at] | (uint32_t)buf[at + 1] << 8 | (uint32_t)buf[at + 2] << 16 |
                     (uint32_t)buf[at + 3] << 24;
        char why[160] = "";
        msgpack_unpacked u;
        msgpack_unpacked_init(&u);
        size_t off = 0;
        if (n == 0)
            snprintf(why, sizeof why, "a reply frame of 0 bytes (a frame holds one msgpack map)");
        else if (got - at - 4 < n)
            snprintf(why, sizeof why, "a reply frame of %u bytes ends after %zu", n, got - at - 4);
        else if (msgpack_unpack_next(&u, (const char *)buf + at + 4, n, &off) !=
                     MSGPACK_UNPACK_SUCCESS || off != n || u.data.type != MSGPACK_OBJECT_MAP)
            snprintf(why, sizeof why, "a reply frame of %u bytes is not exactly one msgpack map",
                     n);
        if (*why) {
            emit(json_pack("{s:s, s:s}", "error", "protocol", "message", why));
            msgpack_unpacked_destroy(&u);
            break;
        }
        emit(json_pack("{s:o}", "reply", to_json(&u.data)));
        msgpack_unpacked_destroy(&u);
        at += 4 + n;
    }
    free(buf);
    return 0;
}

int conform_main(int argc, char **argv) {
    const char *cmd = argv[1], *kind = "ring", *image = NULL, *start = NULL, *ops = NULL,
               *encode = NULL, *decode = NULL;
    int64_t slot = -1;
    int oldest = 0, n_members = 0;
    char **members = calloc((size_t)argc, sizeof *members);
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--oldest")) {
            oldest = 1;
            continue;
        }
        if (v == NULL)
            return usage("an option lacks its value");
        i++;
        if (!strcmp(a, "--kind"))
            kind = v;
        else if (!strcmp(a, "--image"))
            image = v;
        else if (!strcmp(a, "--start"))
            start = v;
        else if (!strcmp(a, "--slot"))
            slot = strtoll(v, NULL, 10);
        else if (!strcmp(a, "--member"))
            members[n_members++] = argv[i];
        else if (!strcmp(a, "--ops"))
            ops = v;
        else if (!strcmp(a, "--encode"))
            encode = v;
        else if (!strcmp(a, "--decode"))
            decode = v;
        else
            return usage("unknown option");
    }
    int rc;
    if (!strcmp(cmd, "conform-frames"))
        rc = encode || decode ? cmd_frames(encode, decode) : usage("--encode or --decode");
    else if (image == NULL)
        rc = usage("--image FILE is needed");
    else if (strcmp(kind, "ring") && strcmp(kind, "group") && strcmp(kind, "stream"))
        rc = usage("--kind must be ring, group or stream");
    else if (!strcmp(cmd, "conform-read"))
        rc = cmd_read(kind, image, start, slot, members, n_members);
    else if (!strcmp(cmd, "conform-point"))
        rc = cmd_point(image, oldest);
    else if (!strcmp(cmd, "conform-write"))
        rc = cmd_write(kind, image, ops);
    else
        rc = usage("unknown conformance command");
    free(members);
    fflush(stdout);
    return rc;
}
