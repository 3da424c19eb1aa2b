/* Channels (sdk/channel.py) and their subscriptions, exclusive and publisher groups
 * (sdk/group.py): the daemon is asked once for the ring (and lazily for the publisher role or
 * a subscriber slot); every publish and receive then goes straight to the shared mapping. */
#include <errno.h>
#include <fcntl.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>

#include "internal.h"

#define DEFAULT_PUBLISH_TIMEOUT 10.0
#define DEFAULT_SPIN_US 100
#define MIN_SPIN 2e-6
#define YIELD_AFTER 5e-6
#define MAX_SLEEP 0.25

static atomic_llong channel_keys;   /* which of our channel objects publishes (the `key`) */

typedef struct member {   /* a subscriber's mapping of, and cursor in, one member ring */
    uint32_t id;
    shm_seg seg;
    ring_reader r;
} member;

struct shimmy_sub {
    shimmy_channel *ch;
    struct shimmy_sub *next_sub;
    uint32_t slot;
    sem_t *sem;
    uint8_t epoch;            /* sleep epoch stored last (1..255) */
    ring_reader reader;       /* exclusive channel: the channel's ring */
    int group;
    member **members;
    size_t n_members;
    member *cur;              /* the member read first (the one that delivered last) */
    size_t next;              /* where the round goes on */
    uint32_t gepoch, armed;   /* group epoch the member list is for; when last armed */
    uint64_t lost_gone;       /* losses of members reclaimed since */
    int64_t last_seq;
    uint32_t last_publisher;
    ring_reader *held;        /* the reader of the view handed out last, and its end */
    uint64_t held_end;
    double spin_max, spin;
};

struct shimmy_channel {
    shimmy_client *c;
    char name[256];
    char mode[16];
    char sem_prefix[256];
    char room_sem[256];       /* the channel ring's room semaphore ("": the daemon made none) */
    shm_seg seg;
    wakeups wk;               /* the channel ring's, or our member ring's (channel semaphores) */
    ring_writer writer;
    int publishing;
    shm_seg member;           /* a group: our own member ring */
    uint32_t publisher_id;
    uint32_t max_publishers;
    double publish_timeout;
    int spin_us;
    int64_t key;
    int closed;
    shimmy_sub *subs;
};

shimmy_channel_opts shimmy_channel_defaults(void) {
    shimmy_channel_opts o = {NULL, 0, 0, DEFAULT_PUBLISH_TIMEOUT, -1};
    return o;
}

const char *shimmy_channel_mode(const shimmy_channel *ch) { return ch->mode; }
uint64_t shimmy_channel_capacity(const shimmy_channel *ch) { return ch->seg.cap; }
uint64_t shimmy_channel_max_message(const shimmy_channel *ch) { return ch->seg.max_message; }
uint32_t shimmy_channel_max_publishers(const shimmy_channel *ch) { return ch->max_publishers; }
uint32_t shimmy_channel_publisher_id(const shimmy_channel *ch) { return ch->publisher_id; }

int shimmy_channel_open(shimmy_client *client, const char *name, const shimmy_channel_opts *opts,
                        shimmy_channel **out) {
    *out = NULL;
    shimmy_channel_opts o = opts ? *opts : shimmy_channel_defaults();
    int rc = validate_name(name);
    if (rc < 0)
        return rc;
    if (o.mode != NULL && strcmp(o.mode, "reliable") && strcmp(o.mode, "lossy"))
        return shm_fail(SHIMMY_E_INVALID_ARGUMENT, "mode must be one of ['lossy', 'reliable'], "
                        "got '%s'", o.mode);
    if (o.capacity && (o.capacity < MIN_CAPACITY || o.capacity > MAX_CAPACITY ||
                       (o.capacity & (o.capacity - 1))))
        return shm_fail(SHIMMY_E_INVALID_ARGUMENT, "capacity %llu must be a power of two "
                        "between %llu and %llu", (unsigned long long)o.capacity, MIN_CAPACITY,
                        MAX_CAPACITY);
    ctl_reply r;
    rc = ctl_request(client, "open", &r, "s:name", name, "s:mode", o.mode,
                     "o:capacity", (int64_t)o.capacity, "o:max_publishers",
                     (int64_t)o.max_publishers, NULL);
    if (rc < 0)
        return rc;
    shimmy_channel *ch = calloc(1, sizeof *ch);
    if (ch == NULL) {
        reply_free(&r);
        return shm_fail(SHIMMY_E_LIMIT, "out of memory");
    }
    ch->c = client;
    snprintf(ch->name, sizeof ch->name, "%s", name);
    ch->publish_timeout = o.publish_timeout;
    ch->spin_us = o.spin_us < 0 ? DEFAULT_SPIN_US : o.spin_us;
    ch->key = atomic_fetch_add(&channel_keys, 1) + 1;
    int64_t pubs = 1;
    char shm[256];
    if ((rc = mp_str(r.map, "shm", shm, sizeof shm)) < 0 ||
        (rc = mp_str(r.map, "sem_prefix", ch->sem_prefix, sizeof ch->sem_prefix)) < 0 ||
        (rc = mp_str(r.map, "mode", ch->mode, sizeof ch->mode)) < 0)
        goto fail;
    if (mp_get(r.map, "max_publishers") != NULL && (rc = mp_int(r.map, "max_publishers", &pubs)) < 0)
        goto fail;
    if (mp_get(r.map, "room_sem") != NULL &&
        (rc = mp_str(r.map, "room_sem", ch->room_sem, sizeof ch->room_sem)) < 0)
        goto fail;
    ch->max_publishers = (uint32_t)pubs;
    if ((rc = seg_map(shm, 'r', &ch->seg)) < 0)
        goto fail;
    if ((rc = wakeups_init(&ch->wk, &ch->seg, ch->sem_prefix)) < 0) {
        seg_unmap(&ch->seg);
        goto fail;
    }
    reply_free(&r);
    *out = ch;
    return 0;
fail:
    reply_free(&r);
    free(ch);
    return rc;
}

/* Channel._check */
static int channel_check(shimmy_channel *ch) {
    if (ch->closed)
        return shm_fail(SHIMMY_E_CLOSED, "channel '%s' is closed", ch->name);
    if (ld_rlx(ch->seg.mem + OFF_RETIRED))
        return shm_retired(ch->name);
    return 0;
}

/* Channel._become_publisher: the role from the daemon; a group's reply names our member ring,
 * whose subscribers sleep on the channel's semaphores. */
static int become_publisher(shimmy_channel *ch) {
    int rc = channel_check(ch);
    if (rc < 0)
        return rc;
    ctl_reply r;
    if ((rc = ctl_request(ch->c, "publish", &r, "s:name", ch->name, "i:key", ch->key, NULL)) < 0)
        return rc;
    const msgpack_object *m = mp_get(r.map, "member");
    if (m == NULL || m->type != MSGPACK_OBJECT_MAP) {
        reply_free(&r);
        writer_close(&ch->writer);
        if ((rc = writer_init(&ch->writer, &ch->seg, &ch->wk, ch->room_sem)) < 0)
            return rc;
        ch->publishing = 1;
        return 0;
    }
    char shm[256], room[256] = "";
    int64_t id;
    if ((rc = mp_str(m, "shm", shm, sizeof shm)) < 0 || (rc = mp_int(m, "id", &id)) < 0 ||
        (mp_get(m, "room_sem") != NULL && (rc = mp_str(m, "room_sem", room, sizeof room)) < 0)) {
        reply_free(&r);
        return rc;
    }
    reply_free(&r);
    if (ch->member.mem == NULL) {
        if ((rc = seg_map(shm, 'r', &ch->member)) < 0)
            return rc;
        wakeups_close(&ch->wk);
        if ((rc = wakeups_init(&ch->wk, &ch->member, ch->sem_prefix)) < 0)
            return rc;
    }
    ch->publisher_id = (uint32_t)id;
    writer_close(&ch->writer);
    if ((rc = writer_init(&ch->writer, &ch->member, &ch->wk, room)) < 0)
        return rc;
    ch->publishing = 1;
    return 0;
}

static inline int publisher(shimmy_channel *ch) {
    if (__builtin_expect(ch->publishing && !ch->closed, 1))
        return 0;
    return become_publisher(ch);
}

int shimmy_publish(shimmy_channel *ch, const void *data, size_t n, uint64_t *seq) {
    int rc = publisher(ch);
    if (rc < 0)
        return rc;
    if (ch->writer.loan_n != UINT64_MAX)
        ch->writer.loan_n = UINT64_MAX;   /* an open loan is abandoned: nothing was stored */
    return writer_publish(&ch->writer, data, n, ch->publish_timeout, seq);
}

int64_t shimmy_publish_many(shimmy_channel *ch, const struct iovec *msgs, size_t count,
                            size_t *published) {
    if (published != NULL)
        *published = 0;
    int rc = publisher(ch);
    if (rc < 0)
        return rc;
    ch->writer.loan_n = UINT64_MAX;
    return writer_publish_many(&ch->writer, msgs, count, ch->publish_timeout, published);
}

int shimmy_loan(shimmy_channel *ch, size_t n, void **buf) {
    *buf = NULL;
    int rc = publisher(ch);
    if (rc < 0)
        return rc;
    if (n > ch->writer.seg->max_message)
        return shm_fail(SHIMMY_E_MESSAGE_TOO_LARGE, "loan of %zu bytes exceeds the largest "
                        "message %llu bytes of channel '%s'", n,
                        (unsigned long long)ch->writer.seg->max_message, ch->name);
    return writer_claim(&ch->writer, n, ch->publish_timeout, buf);
}

int shimmy_commit(shimmy_channel *ch, uint64_t *seq) {
    if (!ch->publishing || ch->writer.loan_n == UINT64_MAX)
        return shm_fail(SHIMMY_E_INVALID_ARGUMENT, "channel '%s': no loan to commit (call "
                        "shimmy_loan first; a publish in between abandons it)", ch->name);
    uint64_t s = writer_commit_claim(&ch->writer, ch->writer.loan_n);
    if (seq != NULL)
        *seq = s;
    return 0;
}

void shimmy_loan_cancel(shimmy_channel *ch) { ch->writer.loan_n = UINT64_MAX; }

/* ---- subscriptions ----------------------------------------------------------------------- */

static void member_close(member *m, uint32_t slot) {
    reader_close(&m->r);
    st8_rlx(m->seg.mem + waiting_offset(slot), 0);
    seg_unmap(&m->seg);
    free(m);
}

static void use_member(shimmy_sub *s, member *m, size_t following) {
    s->cur = m;
    s->next = following;
}

/* GroupSubscription._set_members: keep the members still listed, map new ones, drop the
 * reclaimed ones (every subscriber had read them to their end).  New rings are mapped first,
 * so a failure leaves the subscription as it was. */
static member *find_member(shimmy_sub *s, uint32_t id) {
    for (size_t j = 0; j < s->n_members; j++)
        if (s->members[j] != NULL && s->members[j]->id == id)
            return s->members[j];
    return NULL;
}

static int set_members(shimmy_sub *s, const msgpack_object *infos, uint32_t epoch) {
    if (infos == NULL || infos->type != MSGPACK_OBJECT_ARRAY)
        return shm_fail(SHIMMY_E_PROTOCOL, "daemon reply lacks the list 'members'");
    size_t n = infos->via.array.size, kept = 0;
    member **keep = calloc(n ? n : 1, sizeof *keep);
    if (keep == NULL)
        return shm_fail(SHIMMY_E_LIMIT, "out of memory");
    int rc = 0;
    for (size_t i = 0; i < n && rc == 0; i++) {
        const msgpack_object *info = &infos->via.array.ptr[i];
        int64_t id, position, seq;
        char shm[256], room[256] = "";
        if ((rc = mp_int(info, "id", &id)) < 0 || (rc = mp_int(info, "position", &position)) < 0 ||
            (rc = mp_int(info, "seq", &seq)) < 0 || (rc = mp_str(info, "shm", shm, sizeof shm)) < 0 ||
            (mp_get(info, "room_sem") != NULL &&
             (rc = mp_str(info, "room_sem", room, sizeof room)) < 0))
            break;
        member *m = find_member(s, (uint32_t)id);
        if (m == NULL) {
            if ((m = calloc(1, sizeof *m)) == NULL) {
                rc = shm_fail(SHIMMY_E_LIMIT, "out of memory");
                break;
            }
            rc = seg_map(shm, 'r', &m->seg);
            if (rc < 0) {
                free(m);
                if (rc == -SHIMMY_E_CLOSED)   /* reclaimed since the reply: drained by all */
                    rc = 0;
                continue;
            }
            m->id = (uint32_t)id;
            reader_init(&m->r, &m->seg, s->slot, (uint64_t)position, (uint64_t)seq, room);
            m->r.group = (const uint32_t *)(s->ch->seg.mem + OFF_GROUP_EPOCH);
            m->r.publisher = (uint32_t)id;
        }
        keep[kept++] = m;
    }
    if (rc < 0) {   /* close what was mapped here; the members we had stay as they were */
        for (size_t j = 0; j < kept; j++)
            if (find_member(s, keep[j]->id) != keep[j])
                member_close(keep[j], s->slot);
        free(keep);
        return rc;
    }
    for (size_t j = 0; j < s->n_members; j++) {
        member *old = s->members[j];
        int stays = 0;
        for (size_t k = 0; k < kept && !stays; k++)
            stays = keep[k] == old;
        if (!stays) {
            s->lost_gone += old->r.lost_total;
            if (s->held == &old->r)
                s->held = NULL;
            member_close(old, s->slot);
        }
    }
    free(s->members);
    s->members = keep;
    s->n_members = kept;
    for (size_t j = 0; j < kept; j++) {
        keep[j]->r.group_epoch = epoch;
        keep[j]->r.merged = kept > 1;
        keep[j]->r.turn = 0;
    }
    if (kept)
        use_member(s, keep[0], 1 % kept);
    else
        s->cur = NULL, s->next = 0;
    s->gepoch = epoch;
    return 0;
}

static int refresh(shimmy_sub *s) {
    int rc = channel_check(s->ch);
    if (rc < 0)
        return rc;
    ctl_reply r;
    if ((rc = ctl_request(s->ch->c, "members", &r, "s:name", s->ch->name, "i:slot",
                          (int64_t)s->slot, NULL)) < 0)
        return rc;
    int64_t epoch;
    rc = mp_int(r.map, "epoch", &epoch);
    if (rc == 0)
        rc = set_members(s, mp_get(r.map, "members"), (uint32_t)epoch);
    reply_free(&r);
    return rc;
}

int shimmy_subscribe(shimmy_channel *ch, enum shimmy_start start, shimmy_sub **out) {
    *out = NULL;
    int rc = channel_check(ch);
    if (rc < 0)
        return rc;
    if (start != SHIMMY_START_NEXT && start != SHIMMY_START_OLDEST)
        return shm_fail(SHIMMY_E_INVALID_ARGUMENT, "start must be 'next' or 'oldest', got %d",
                        (int)start);
    ctl_reply r;
    if ((rc = ctl_request(ch->c, "subscribe", &r, "s:name", ch->name, "s:start",
                          start == SHIMMY_START_OLDEST ? "oldest" : "next", NULL)) < 0)
        return rc;
    shimmy_sub *s = calloc(1, sizeof *s);
    int64_t slot = -1, position, seq;
    if (s == NULL) {
        reply_free(&r);
        return shm_fail(SHIMMY_E_LIMIT, "out of memory");
    }
    s->ch = ch;
    s->last_seq = -1;
    if ((rc = mp_int(r.map, "slot", &slot)) < 0 || (rc = mp_int(r.map, "position", &position)) < 0 ||
        (rc = mp_int(r.map, "seq", &seq)) < 0)
        goto fail;
    if (slot < 0 || (uint64_t)slot >= ch->seg.max_subs) {
        rc = shm_fail(SHIMMY_E_PROTOCOL, "daemon handed out slot %lld of %u", (long long)slot,
                      ch->seg.max_subs);
        goto fail;
    }
    s->slot = (uint32_t)slot;
    reader_init(&s->reader, &ch->seg, s->slot, (uint64_t)position, (uint64_t)seq, ch->room_sem);
    char name[300];
    snprintf(name, sizeof name, "%s%u", ch->sem_prefix, s->slot);
    s->sem = sem_open(name, 0);
    if (s->sem == SEM_FAILED) {
        s->sem = NULL;
        rc = shm_fail(errno == EACCES ? SHIMMY_E_PERMISSION_DENIED : SHIMMY_E_ERROR,
                      "cannot open semaphore /dev/shm/sem.%s: %s", name + 1, strerror(errno));
        goto fail;
    }
    const msgpack_object *members = mp_get(r.map, "members");
    if (members != NULL) {
        int64_t epoch;
        s->group = 1;
        if ((rc = mp_int(r.map, "epoch", &epoch)) < 0 ||
            (rc = set_members(s, members, (uint32_t)epoch)) < 0)
            goto fail;
    }
    reply_free(&r);
    s->spin_max = s->spin = ch->spin_us / 1e6;
    s->next_sub = ch->subs;
    ch->subs = s;
    *out = s;
    return 0;
fail:
    reply_free(&r);
    if (s->sem != NULL)
        sem_close(s->sem);
    for (size_t j = 0; j < s->n_members; j++)
        member_close(s->members[j], s->slot);
    free(s->members);
    free(s);
    if (slot >= 0) {   /* give the slot back; the text of the first error stays */
        char text[1024];
        snprintf(text, sizeof text, "%s", shimmy_errmsg());
        if (ctl_request(ch->c, "unsubscribe", &r, "s:name", ch->name, "i:slot", slot, NULL) == 0)
            reply_free(&r);
        shm_fail(-rc, "%s", text);
    }
    return rc;
}

void shimmy_sub_close(shimmy_sub *s) {
    if (s == NULL)
        return;
    shimmy_channel *ch = s->ch;
    for (shimmy_sub **p = &ch->subs; *p != NULL; p = &(*p)->next_sub)
        if (*p == s) {
            *p = s->next_sub;
            break;
        }
    for (size_t j = 0; j < s->n_members; j++)
        member_close(s->members[j], s->slot);
    free(s->members);
    sem_close(s->sem);
    reader_close(&s->reader);
    st8_rlx(ch->seg.mem + waiting_offset(s->slot), 0);
    ctl_reply r;
    if (!client_closed(ch->c) &&
        ctl_request(ch->c, "unsubscribe", &r, "s:name", ch->name, "i:slot", (int64_t)s->slot,
                    NULL) == 0)
        reply_free(&r);
    free(s);
}

uint64_t shimmy_sub_lost(const shimmy_sub *s) {
    if (!s->group)
        return s->reader.lost_total;
    uint64_t lost = s->lost_gone;
    for (size_t j = 0; j < s->n_members; j++)
        lost += s->members[j]->r.lost_total;
    return lost;
}

int64_t shimmy_sub_last_seq(const shimmy_sub *s) { return s->last_seq; }
uint32_t shimmy_sub_last_publisher(const shimmy_sub *s) { return s->last_publisher; }

/* ---- receiving: one attempt of each kind, then the wait ---------------------------------- */

enum kind { VIEW, COPY, MANY };
typedef struct {
    enum kind kind;
    shimmy_message *msg;
    uint8_t *buf;
    uint64_t cap;
    size_t *lens;
    uint64_t *seqs;
    size_t max_n;
} attempt_args;

/* RingReader.take_many_bytes for one reader: copies packed at 16-byte aligned offsets, one
 * position store at the end (also when an error ends the batch). */
static int64_t take_many(ring_reader *r, attempt_args *a) {
    uint64_t off = 0;
    size_t n = 0;
    int rc = 0;
    while (n < a->max_n && off < a->cap) {
        uint64_t len, seq;
        rc = reader_take_copy(r, a->buf + off, a->cap - off, &len, &seq, 0);
        if (rc <= 0)
            break;
        a->lens[n] = len;
        if (a->seqs != NULL)
            a->seqs[n] = seq;
        n++;
        off = (off + len + 15) & ~(uint64_t)15;
    }
    reader_release_to(r, r->position);   /* SYNC POINT (consumption): all copied or skipped */
    if (rc == -SHIMMY_E_INVALID_ARGUMENT && n > 0)
        rc = 0;   /* the buffer is full: the rest waits for the next call */
    if (rc < 0)
        return rc;
    return (int64_t)n;
}

static int64_t attempt_reader(shimmy_sub *s, ring_reader *r, attempt_args *a) {
    int64_t got;
    if (a->kind == VIEW) {
        shimmy_message *m = a->msg;
        uint64_t len;
        got = reader_take(r, &m->data, &len, &m->seq, &m->lost, &m->position_);
        if (got > 0) {
            m->len = len;
            m->publisher = r->publisher;
            m->src_ = r;
            s->held = r;
            s->held_end = r->position;
        }
    } else if (a->kind == COPY) {
        uint64_t len, seq;
        got = reader_take_copy(r, a->buf, a->cap, &len, &seq, 1);
        if (got > 0) {
            a->lens[0] = len;
            if (a->seqs != NULL)
                a->seqs[0] = seq;
        }
    } else {
        got = take_many(r, a);
    }
    if (got > 0) {
        s->last_seq = (int64_t)(r->expect - 1);
        s->last_publisher = r->publisher;
    }
    return got;
}

/* GroupSubscription._rotate: the members in turn from `next`, refreshing the list first when
 * the group epoch moved. */
static int64_t attempt_rotate(shimmy_sub *s, attempt_args *a) {
    if (ld32_rlx(s->ch->seg.mem + OFF_GROUP_EPOCH) != s->gepoch) {
        int rc = refresh(s);
        if (rc < 0)
            return rc;
    }
    size_t n = s->n_members, i = s->next;
    for (size_t k = 0; k < n; k++) {
        member *m = s->members[i];
        i = i + 1 < n ? i + 1 : 0;
        int64_t got = attempt_reader(s, &m->r, a);
        if (got != 0) {
            if (got > 0)
                use_member(s, m, i);
            return got;
        }
    }
    return 0;
}

static int64_t attempt(shimmy_sub *s, attempt_args *a) {
    if (!s->group)
        return attempt_reader(s, &s->reader, a);
    if (s->cur != NULL) {
        int64_t got = attempt_reader(s, &s->cur->r, a);
        if (got != 0)
            return got;
    }
    return attempt_rotate(s, a);
}

static int has_data(shimmy_sub *s) {
    if (!s->group)
        return reader_has_data(&s->reader);
    if (ld32_rlx(s->ch->seg.mem + OFF_GROUP_EPOCH) != s->gepoch)
        return 1;
    for (size_t j = 0; j < s->n_members; j++)
        if (reader_has_data(&s->members[j]->r))
            return 1;
    return 0;
}

/* Store `epoch` (0 = awake) in our waiting byte of every ring we read. */
static void arm(shimmy_sub *s, uint8_t epoch) {
    if (!s->group) {
        st8_rlx(s->ch->seg.mem + waiting_offset(s->slot), epoch);
        return;
    }
    s->armed = s->gepoch;
    for (size_t j = 0; j < s->n_members; j++)
        st8_rlx(s->members[j]->seg.mem + waiting_offset(s->slot), epoch);
}

static int must_rearm(shimmy_sub *s) {
    return s->group && (s->armed != s->gepoch ||
                        ld32_rlx(s->ch->seg.mem + OFF_GROUP_EPOCH) != s->gepoch);
}

static int check_slot(shimmy_sub *s) {
    const uint8_t *line = s->ch->seg.mem + CONTROL_SIZE + (uint64_t)s->slot * SLOT_SIZE;
    if (ld32_rlx(line + 8) == SLOT_EVICTED)
        return shm_fail(SHIMMY_E_CLOSED, "subscription to '%s' was evicted: this process sent "
                        "no heartbeat for the daemon's lease_timeout; subscribe again",
                        s->ch->name);
    return 0;
}

/* Subscription._wait: spin (adaptive, yielding after YIELD_AFTER), then sleep on our
 * semaphore under the wake-up handshake, re-checking at least every MAX_SLEEP. */
static int64_t wait_for(shimmy_sub *s, double timeout, attempt_args *a) {
    int64_t rc = channel_check(s->ch);
    if (rc < 0)
        return rc;
    double now = mono_now();
    double deadline = timeout < 0 ? -1 : now + timeout;
    double spin_end = now + s->spin;
    if (deadline >= 0 && spin_end > deadline)
        spin_end = deadline;
    double yield_at = now + YIELD_AFTER;
    for (;;) {
        if (has_data(s)) {
            rc = attempt(s, a);
            if (rc != 0) {
                if (rc > 0) {
                    s->spin = s->spin * 2 > MIN_SPIN ? s->spin * 2 : MIN_SPIN;
                    if (s->spin > s->spin_max)
                        s->spin = s->spin_max;
                }
                return rc;
            }
        }
        double t = mono_now();
        if (t >= spin_end)
            break;
        if (t >= yield_at)
            sched_yield();
    }
    double slept_at = mono_now();
    for (;;) {
        s->epoch = (uint8_t)(s->epoch % 255 + 1);   /* ring.next_epoch */
        arm(s, s->epoch);
        /* SYNC POINT (Dekker pair with the commit): store waiting, FENCE, load tail */
        full_fence();
        rc = attempt(s, a);
        if (rc != 0)
            break;
        if (must_rearm(s))
            continue;
        now = mono_now();
        if (deadline >= 0 && now >= deadline) {
            char secs[32];
            fmt_secs(secs, sizeof secs, timeout);
            rc = shm_fail(SHIMMY_E_TIMEOUT, "no message on '%s' within %s s", s->ch->name, secs);
            break;
        }
        double wait = deadline < 0 || deadline - now > MAX_SLEEP ? MAX_SLEEP : deadline - now;
        if (!sem_wait_for(s->sem, wait)) {
            if ((rc = channel_check(s->ch)) < 0 || (rc = check_slot(s)) < 0)
                break;
        }
    }
    arm(s, 0);
    if (rc > 0) {
        if (mono_now() - slept_at < s->spin_max) {
            s->spin = s->spin * 2 > MIN_SPIN ? s->spin * 2 : MIN_SPIN;
            if (s->spin > s->spin_max)
                s->spin = s->spin_max;
        } else {
            s->spin = s->spin_max > 0 ? (s->spin / 2 > MIN_SPIN ? s->spin / 2 : MIN_SPIN) : 0;
        }
    }
    return rc;
}

static int64_t receive(shimmy_sub *s, double timeout, attempt_args *a) {
    int64_t got = attempt(s, a);
    if (got == 0)
        got = wait_for(s, timeout, a);
    return got;
}

int shimmy_receive(shimmy_sub *s, shimmy_message *msg, double timeout) {
    attempt_args a = {.kind = VIEW, .msg = msg};
    int64_t rc = receive(s, timeout, &a);
    return rc < 0 ? (int)rc : 0;
}

int shimmy_message_valid(const shimmy_message *msg) {
    return reader_head_at_most((const ring_reader *)msg->src_, msg->position_);
}

void shimmy_release(shimmy_sub *s) {
    /* only the view handed out last still holds its frame (the next take released the
     * earlier ones) */
    if (s->held != NULL && s->held_end == s->held->position)
        reader_release_to(s->held, s->held_end);
}

int shimmy_receive_copy(shimmy_sub *s, void *buf, size_t cap, size_t *len, uint64_t *seq,
                        double timeout) {
    size_t l;
    attempt_args a = {.kind = COPY, .buf = buf, .cap = cap, .lens = &l, .seqs = seq};
    int64_t rc = receive(s, timeout, &a);
    if (rc < 0)
        return (int)rc;
    if (len != NULL)
        *len = l;
    return 0;
}

int64_t shimmy_receive_many(shimmy_sub *s, void *buf, size_t cap, size_t *lens, uint64_t *seqs,
                            size_t max_n, double timeout) {
    if (max_n < 1)
        return shm_fail(SHIMMY_E_INVALID_ARGUMENT, "max_n must be a positive int, got %zu",
                        max_n);
    attempt_args a = {.kind = MANY, .buf = buf, .cap = cap, .lens = lens, .seqs = seqs,
                      .max_n = max_n};
    return receive(s, timeout, &a);
}

void shimmy_channel_close(shimmy_channel *ch) {
    if (ch == NULL)
        return;
    while (ch->subs != NULL)
        shimmy_sub_close(ch->subs);
    ch->closed = 1;
    wakeups_close(&ch->wk);
    writer_close(&ch->writer);
    ctl_reply r;
    if (!client_closed(ch->c) &&
        ctl_request(ch->c, "close", &r, "s:name", ch->name, "i:key", ch->key, NULL) == 0)
        reply_free(&r);
    seg_unmap(&ch->member);
    seg_unmap(&ch->seg);
    free(ch);
}
