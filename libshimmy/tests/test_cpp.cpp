// shimmy.hpp against a real daemon ($SHIMMY_DAEMON): publish, loan (committed, and abandoned by
// an exception), zero-copy receive, errors as exceptions with Python's codes, a stream.
#include <algorithm>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <vector>

#include "shimmy.hpp"

int main() {
    shimmy::Client client;
    try {
        shimmy::Channel bad(client, "no//good");
        std::puts("FAIL: a bad name was accepted");
        return 1;
    } catch (const shimmy::Error &e) {
        if (e.code() != SHIMMY_E_INVALID_NAME || std::strstr(e.what(), "bad segment") == nullptr) {
            std::printf("FAIL: %s\n", e.what());
            return 1;
        }
    }
    shimmy::Channel ch(client, "cpp/smoke");
    shimmy::Subscription sub(ch);
    ch.publish("first", 5);
    try {
        ch.loan(8, [](void *) { throw std::runtime_error("abandon"); });
    } catch (const std::runtime_error &) {
    }
    uint64_t seq = ch.loan(6, [](void *buf) { std::memcpy(buf, "second", 6); });
    shimmy_message a = sub.receive(5), b = sub.receive(5);
    if (a.len != 5 || std::memcmp(a.data, "first", 5) || b.len != 6 || seq != 1 ||
        b.seq != 1 || std::memcmp(b.data, "second", 6)) {
        std::puts("FAIL: messages");
        return 1;
    }
    try {
        sub.receive(0.05);
        std::puts("FAIL: no timeout");
        return 1;
    } catch (const shimmy::Error &e) {
        if (e.code() != SHIMMY_E_TIMEOUT)
            return 1;
    }
    std::vector<char> out(100000), in(100000);
    for (size_t i = 0; i < in.size(); i++)
        in[i] = static_cast<char>(i * 7);
    {
        shimmy::Stream w(client, "cpp/stream", SHIMMY_WRITER, 65536);
        shimmy::Stream r(client, "cpp/stream", SHIMMY_READER, 65536);
        size_t got = 0;
        for (size_t at = 0; at < in.size(); at += 30000) {
            w.write(in.data() + at, std::min<size_t>(30000, in.size() - at), 5);
            while (got < at + std::min<size_t>(30000, in.size() - at))
                got += r.read(out.data() + got, out.size() - got, 5);
        }
        w.close();
        if (r.read(out.data(), 1, 5) != 0 || out != in) {
            std::puts("FAIL: stream");
            return 1;
        }
    }
    std::puts("cpp: ok");
    return 0;
}
