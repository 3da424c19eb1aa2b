/* libshimmy: the C client of Shimmy (channels and streams over the node daemon's shared memory).
 *
 * The same channels and streams as the Python SDK (shimmy.Channel, shimmy.Stream): a C process
 * and a Python process may publish to and subscribe from one channel, in either direction, and
 * take over each other's publisher role.  The ring and its orderings are spec/ring.md,
 * the control protocol spec/control.md (version 2: length-prefixed msgpack maps over a unix
 * stream socket), streams spec/stream.md.
 *
 * Errors.  Every call that can fail returns 0 (or a count) on success and a negative
 * SHIMMY_E_* code on failure; shimmy_errmsg() then gives the text, which is the text the Python
 * SDK puts in the matching exception (the daemon's own message for a daemon refusal), and
 * shimmy_code_name() the code string of shimmy/errors.py ("invalid_argument", "timeout", ...).
 * The text lives in thread-local storage until the thread's next failing call.
 *
 * Timeouts are seconds as a double; a negative value waits for ever; 0 does not wait.
 *
 * Threads.
 *  - shimmy_client: thread-safe.  Requests to the daemon are serialised by a lock inside it;
 *    one heartbeat thread per client keeps the lease (started by shimmy_connect, stopped by
 *    shimmy_disconnect), so a caller has no heartbeat duty.
 *  - shimmy_channel (its publishing calls: publish, publish_many, loan, commit): one thread at
 *    a time.  Every shimmy_channel is a publisher of its own (in a publisher group, two
 *    channel objects in one process are two publishers).  Subscribing and closing a
 *    subscription may run in any thread, but not concurrently with shimmy_channel_close.
 *  - shimmy_sub: one thread at a time (a receive hands out a view that the next receive on the
 *    same subscription releases).  Different subscriptions may be used by different threads.
 *  - shimmy_stream: one thread at a time per end; the two ends of one stream may be in two
 *    threads of one process.
 *  - Close every object made from a client before shimmy_disconnect.
 *  - A client whose daemon went away (its session closed, a request unanswered within 5 s, a
 *    malformed reply) fails every later request with SHIMMY_E_DAEMON_UNAVAILABLE; channels of
 *    a deleted channel or of a restarted daemon fail with SHIMMY_E_RETIRED.  Connect again and reopen (there is no
 *    reopen in place as Python's Channel.reopen).
 *  - fork(): objects opened before fork() must not be used in the child (they would make the
 *    child a second writer of the parent's words); the child connects anew.
 */
#ifndef SHIMMY_H
#define SHIMMY_H

#include <stddef.h>
#include <stdint.h>
#include <sys/uio.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SHIMMY_PROTOCOL_VERSION 2   /* control protocol spoken (spec/control.md) */
#define SHIMMY_RING_LAYOUT 2        /* pub/sub ring layout read and written (ring-format.md) */
#define SHIMMY_STREAM_LAYOUT 1      /* stream ring layout (spec/stream.md) */

/* Error codes: the negated values are returned.  Names match shimmy/errors.py's codes. */
enum shimmy_code {
    SHIMMY_OK = 0,
    SHIMMY_E_ERROR = 1,                 /* "error"               ShimmyError */
    SHIMMY_E_DAEMON_UNAVAILABLE = 2,    /* "daemon_unavailable"  DaemonUnavailable */
    SHIMMY_E_INVALID_NAME = 3,          /* "invalid_name"        InvalidName */
    SHIMMY_E_INVALID_ARGUMENT = 4,      /* "invalid_argument"    InvalidArgument */
    SHIMMY_E_MESSAGE_TOO_LARGE = 5,     /* "message_too_large"   MessageTooLarge */
    SHIMMY_E_CONFLICT = 6,              /* "conflict"            ChannelConflict */
    SHIMMY_E_NOT_FOUND = 7,             /* "not_found"           ChannelNotFound */
    SHIMMY_E_LIMIT = 8,                 /* "limit"               LimitExceeded */
    SHIMMY_E_PERMISSION_DENIED = 9,     /* "permission_denied"   PermissionDenied */
    SHIMMY_E_BACKPRESSURE_TIMEOUT = 10, /* "backpressure_timeout" BackpressureTimeout */
    SHIMMY_E_TIMEOUT = 11,              /* "timeout"             ReceiveTimeout */
    SHIMMY_E_CLOSED = 12,               /* "closed"              ChannelClosed */
    SHIMMY_E_PROTOCOL = 13,             /* "protocol"            ProtocolError */
    SHIMMY_E_STREAM_BUSY = 14,          /* "stream_busy"         StreamBusy */
    SHIMMY_E_STREAM_BROKEN = 15,        /* "stream_broken"       StreamBroken */
    SHIMMY_E_PUBLISHER_BUSY = 16,       /* "publisher_busy"      PublisherBusy */
    SHIMMY_E_RING_CORRUPTED = 17,       /* "ring_corrupted"      RingCorrupted */
    SHIMMY_E_OVERWRITTEN = 18,          /* "overwritten"         MessageOverwritten */
    SHIMMY_E_RETIRED = 19,              /* "retired"             ChannelRetired */
};

const char *shimmy_errmsg(void);          /* text of this thread's last error ("" if none) */
const char *shimmy_code_name(int code);   /* "invalid_argument" for SHIMMY_E_INVALID_ARGUMENT
                                             or its negation; "ok" for 0 */

/* ---- the daemon connection --------------------------------------------------------------- */
typedef struct shimmy_client shimmy_client;

/* Connect to the node daemon at `socket_path` (NULL: $SHIMMY_DAEMON, else
 * /run/shimmy/shimmyd.sock): hello, session socket, heartbeat thread. */
int shimmy_connect(const char *socket_path, shimmy_client **out);
/* Say goodbye (a clean exit in the daemon's counters), stop the heartbeat, free. */
void shimmy_disconnect(shimmy_client *client);

/* ---- channels ---------------------------------------------------------------------------- */
typedef struct shimmy_channel shimmy_channel;
typedef struct shimmy_sub shimmy_sub;

typedef struct {
    const char *mode;          /* "reliable", "lossy", or NULL: whatever the channel has */
    uint64_t capacity;         /* ring bytes (power of two, 4 KiB .. 1 GiB); 0: the channel's */
    uint32_t max_publishers;   /* > 1 makes a publisher group; 0: the channel's */
    double publish_timeout;    /* reliable: longest wait for room (s), < 0 for ever; default 10 */
    int spin_us;               /* receivers' adaptive spin ceiling (us); < 0: default 100 */
} shimmy_channel_opts;

/* The defaults (what opts = NULL means). */
shimmy_channel_opts shimmy_channel_defaults(void);

int shimmy_channel_open(shimmy_client *client, const char *name, const shimmy_channel_opts *opts,
                        shimmy_channel **out);
void shimmy_channel_close(shimmy_channel *ch);   /* closes its subscriptions too */
const char *shimmy_channel_mode(const shimmy_channel *ch);    /* "reliable" / "lossy" */
uint64_t shimmy_channel_capacity(const shimmy_channel *ch);
uint64_t shimmy_channel_max_message(const shimmy_channel *ch);
uint32_t shimmy_channel_max_publishers(const shimmy_channel *ch);
uint32_t shimmy_channel_publisher_id(const shimmy_channel *ch);  /* group: ours once publishing */

/* Copy `n` bytes in as one message; *seq (may be NULL) gets its sequence number.  The first
 * publishing call asks the daemon for the publisher role. */
int shimmy_publish(shimmy_channel *ch, const void *data, size_t n, uint64_t *seq);
/* Publish `count` messages with one commit (split only at the wrap point or a wait for room).
 * Returns how many were published (count), or a negative code; then *published (may be NULL)
 * says how many of the batch went out before the error, which names the index. */
int64_t shimmy_publish_many(shimmy_channel *ch, const struct iovec *msgs, size_t count,
                            size_t *published);
/* Zero-copy publish: room for `n` bytes inside the ring, to fill, then shimmy_commit (visible
 * to subscribers) or shimmy_loan_cancel (nothing published, no sequence number used). */
int shimmy_loan(shimmy_channel *ch, size_t n, void **buf);
int shimmy_commit(shimmy_channel *ch, uint64_t *seq);
void shimmy_loan_cancel(shimmy_channel *ch);

enum shimmy_start { SHIMMY_START_NEXT = 0, SHIMMY_START_OLDEST = 1 };
int shimmy_subscribe(shimmy_channel *ch, enum shimmy_start start, shimmy_sub **out);
void shimmy_sub_close(shimmy_sub *sub);

typedef struct {
    const uint8_t *data;   /* zero copy: straight into the ring (valid until the next receive
                              or shimmy_release on this subscription) */
    size_t len;
    uint64_t seq;          /* per publisher */
    uint64_t lost;         /* that publisher's messages missed just before this one */
    uint32_t publisher;    /* publisher id (0 on an exclusive channel) */
    uint64_t position_;    /* private: where the frame is (for shimmy_message_valid) */
    const void *src_;      /* private */
} shimmy_message;

/* Zero copy: the next message as a view.  Lossy mode: the publisher may overwrite a held view;
 * shimmy_message_valid says whether it still holds the bytes received. */
int shimmy_receive(shimmy_sub *sub, shimmy_message *msg, double timeout);
int shimmy_message_valid(const shimmy_message *msg);   /* 1 intact, 0 overwritten */
void shimmy_release(shimmy_sub *sub);   /* hand the last view's bytes back now */
/* Copy path: the next message into buf (released at once).  A message longer than `cap` is
 * SHIMMY_E_INVALID_ARGUMENT and stays unread.  Lossy: a message overwritten while copied is
 * skipped and counted in the next one's loss.  *len gets its length; *seq and *publisher may
 * be NULL. */
int shimmy_receive_copy(shimmy_sub *sub, void *buf, size_t cap, size_t *len, uint64_t *seq,
                        double timeout);
/* Copy path for batches: waits for the first message (up to timeout), then copies it and every
 * message already committed, up to max_n, back to back into buf (each at a 16-byte aligned
 * offset), with one release.  lens[i], seqs[i] (may be NULL) describe message i.  Returns how
 * many (>= 1) or a negative code. */
int64_t shimmy_receive_many(shimmy_sub *sub, void *buf, size_t cap, size_t *lens, uint64_t *seqs,
                            size_t max_n, double timeout);
uint64_t shimmy_sub_lost(const shimmy_sub *sub);      /* messages missed so far, all publishers */
int64_t shimmy_sub_last_seq(const shimmy_sub *sub);   /* -1 before the first message */
uint32_t shimmy_sub_last_publisher(const shimmy_sub *sub);

/* ---- streams ----------------------------------------------------------------------------- */
typedef struct shimmy_stream shimmy_stream;
enum shimmy_role { SHIMMY_WRITER = 0, SHIMMY_READER = 1 };

/* One end of stream `name` (capacity 0: the stream's, or the default 2 MiB when creating). */
int shimmy_stream_open(shimmy_client *client, const char *name, enum shimmy_role role,
                       uint64_t capacity, shimmy_stream **out);
/* Writer: copy all `n` bytes in, waiting (bounded by timeout) while the ring is full.  Returns
 * 0; on SHIMMY_E_BACKPRESSURE_TIMEOUT *written (may be NULL) says how many went in. */
int shimmy_stream_write(shimmy_stream *s, const void *data, size_t n, double timeout,
                        size_t *written);
/* Reader: wait (bounded) until bytes are there; copy up to n.  Returns the count, 0 at a clean
 * end of stream, or a negative code (SHIMMY_E_STREAM_BROKEN once a dead writer's bytes are
 * drained, SHIMMY_E_TIMEOUT). */
int64_t shimmy_stream_read(shimmy_stream *s, void *buf, size_t n, double timeout);
/* Writer: end of stream.  Reader: the writer's next write fails.  Frees the end. */
void shimmy_stream_close(shimmy_stream *s);

#ifdef __cplusplus
}
#endif
#endif
