/* A C publisher: COUNT messages of SIZE bytes on CHANNEL, each starting with its index (u64,
 * little-endian), the rest filled in place through a zero-copy loan.
 *
 *   cc publisher.c -I libshimmy/include libshimmy/build/libshimmy.a -lmsgpackc -pthread -o pub
 *   SHIMMY_DAEMON=/run/shimmy/shimmyd.sock ./pub demo/c 10000 256
 *
 * (make -C libshimmy builds it as libshimmy/build/examples/publisher.) */
#include <shimmy.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv) {
    const char *name = argc > 1 ? argv[1] : "demo/c";
    long count = argc > 2 ? atol(argv[2]) : 10000;
    size_t size = argc > 3 ? (size_t)atol(argv[3]) : 256;
    if (count < 0 || size < 8) {
        fprintf(stderr, "usage: publisher [CHANNEL [COUNT [SIZE >= 8]]]\n");
        return 2;
    }
    shimmy_client *client;
    shimmy_channel *ch;
    int rc = shimmy_connect(NULL, &client);   /* $SHIMMY_DAEMON or /run/shimmy/shimmyd.sock */
    if (rc < 0 || (rc = shimmy_channel_open(client, name, NULL, &ch)) < 0) {
        fprintf(stderr, "publisher: %s (%s)\n", shimmy_errmsg(), shimmy_code_name(rc));
        return 1;
    }
    for (long i = 0; i < count && rc >= 0; i++) {
        void *buf;
        if ((rc = shimmy_loan(ch, size, &buf)) < 0)   /* room inside the ring */
            break;
        uint64_t index = (uint64_t)i;
        memcpy(buf, &index, 8);
        memset((char *)buf + 8, (int)(i % 251), size - 8);
        rc = shimmy_commit(ch, NULL);                 /* now subscribers see it */
    }
    if (rc < 0)
        fprintf(stderr, "publisher: %s (%s)\n", shimmy_errmsg(), shimmy_code_name(rc));
    else
        printf("c-publisher: sent=%ld channel=%s size=%zu\n", count, name, size);
    shimmy_channel_close(ch);
    shimmy_disconnect(client);
    return rc < 0;
}
