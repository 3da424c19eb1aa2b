/* A C subscriber: receives COUNT messages on CHANNEL as zero-copy views and checks that the
 * index each one starts with (u64, little-endian: examples/c/publisher.c, the compose example's
 * Python publisher and shimmy-c all start their messages so) goes up by one.  Prints one summary
 * line; exit status 0 when all COUNT arrived in order.
 *
 *   SHIMMY_DAEMON=/run/shimmy/shimmyd.sock ./sub demo/c 10000 [READY_FILE]
 *
 * READY_FILE is created once subscribed (a container health check can wait for it). */
#include <inttypes.h>
#include <shimmy.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    const char *name = argc > 1 ? argv[1] : "demo/c";
    long count = argc > 2 ? atol(argv[2]) : 10000;
    shimmy_client *client;
    shimmy_channel *ch;
    shimmy_sub *sub;
    int rc = shimmy_connect(NULL, &client);
    if (rc < 0 || (rc = shimmy_channel_open(client, name, NULL, &ch)) < 0 ||
        (rc = shimmy_subscribe(ch, SHIMMY_START_OLDEST, &sub)) < 0) {
        fprintf(stderr, "subscriber: %s (%s)\n", shimmy_errmsg(), shimmy_code_name(rc));
        return 1;
    }
    if (argc > 3) {
        FILE *ready = fopen(argv[3], "w");
        if (ready != NULL)
            fclose(ready);
    }
    long received = 0, bad = 0;
    uint64_t bytes = 0, next = 0;
    while (received < count) {
        shimmy_message msg;
        if ((rc = shimmy_receive(sub, &msg, 60.0)) < 0)   /* wait at most 60 s */
            break;
        uint64_t index = UINT64_MAX;
        if (msg.len >= 8)
            memcpy(&index, msg.data, 8);
        if (index != next)
            bad++;
        next = index + 1;
        bytes += msg.len;
        received++;
    }   /* each view stays valid until the next receive */
    if (rc < 0)
        fprintf(stderr, "subscriber: %s (%s)\n", shimmy_errmsg(), shimmy_code_name(rc));
    printf("c-subscriber: received=%ld expected=%ld out_of_order=%ld bytes=%" PRIu64
           " lost=%" PRIu64 " channel=%s\n", received, count, bad, bytes, shimmy_sub_lost(sub),
           name);
    shimmy_sub_close(sub);
    shimmy_channel_close(ch);
    shimmy_disconnect(client);
    return rc < 0 || bad || received != count;
}
