// shimmy.hpp: a header-only C++17 RAII wrapper over libshimmy (shimmy.h).  Each object owns one
// libshimmy handle and closes it in its destructor; errors are thrown as shimmy::Error, which
// carries the code (SHIMMY_E_*, its name as in shimmy/errors.py) and the same text.  The
// thread-safety rules of shimmy.h apply object for object.
//
//   shimmy::Client client;                                // $SHIMMY_DAEMON or the default
//   shimmy::Channel ch(client, "sensors/temp");
//   ch.publish("21.5", 4);
//   shimmy::Subscription sub(ch);
//   shimmy_message m = sub.receive(1.0);                  // a view, valid until the next one
#ifndef SHIMMY_HPP
#define SHIMMY_HPP

#include <stdexcept>
#include <string>
#include <utility>

#include "shimmy.h"

namespace shimmy {

class Error : public std::runtime_error {
  public:
    explicit Error(int rc)
        : std::runtime_error(std::string(shimmy_code_name(rc)) + ": " + shimmy_errmsg()),
          code_(rc < 0 ? -rc : rc) {}
    int code() const noexcept { return code_; }              // SHIMMY_E_*
    const char *name() const noexcept { return shimmy_code_name(code_); }

  private:
    int code_;
};

inline long long check(long long rc) {
    if (rc < 0)
        throw Error(static_cast<int>(rc));
    return rc;
}

// Move-only ownership of one handle, closed by Close.
template <typename T, void (*Close)(T *)> class Handle {
  public:
    Handle() = default;
    explicit Handle(T *p) : p_(p) {}
    Handle(const Handle &) = delete;
    Handle &operator=(const Handle &) = delete;
    Handle(Handle &&o) noexcept : p_(std::exchange(o.p_, nullptr)) {}
    Handle &operator=(Handle &&o) noexcept {
        if (this != &o) {
            reset();
            p_ = std::exchange(o.p_, nullptr);
        }
        return *this;
    }
    ~Handle() { reset(); }
    void reset() {
        if (p_ != nullptr)
            Close(std::exchange(p_, nullptr));
    }
    T *get() const noexcept { return p_; }

  private:
    T *p_ = nullptr;
};

class Client {
  public:
    explicit Client(const char *socket_path = nullptr) {
        shimmy_client *c = nullptr;
        check(shimmy_connect(socket_path, &c));
        h_ = Handle<shimmy_client, shimmy_disconnect>(c);
    }
    shimmy_client *get() const noexcept { return h_.get(); }

  private:
    Handle<shimmy_client, shimmy_disconnect> h_;
};

class Channel {
  public:
    Channel(const Client &client, const std::string &name,
            const shimmy_channel_opts &opts = shimmy_channel_defaults()) {
        shimmy_channel *ch = nullptr;
        check(shimmy_channel_open(client.get(), name.c_str(), &opts, &ch));
        h_ = Handle<shimmy_channel, shimmy_channel_close>(ch);
    }
    uint64_t publish(const void *data, size_t n) {
        uint64_t seq = 0;
        check(shimmy_publish(h_.get(), data, n, &seq));
        return seq;
    }
    size_t publish_many(const struct iovec *msgs, size_t count) {
        return static_cast<size_t>(check(shimmy_publish_many(h_.get(), msgs, count, nullptr)));
    }
    // Zero copy: fill(void *buf) writes the n bytes in place; committed when it returns,
    // abandoned (nothing published) when it throws.
    template <typename Fill> uint64_t loan(size_t n, Fill &&fill) {
        void *buf = nullptr;
        check(shimmy_loan(h_.get(), n, &buf));
        try {
            fill(buf);
        } catch (...) {
            shimmy_loan_cancel(h_.get());
            throw;
        }
        uint64_t seq = 0;
        check(shimmy_commit(h_.get(), &seq));
        return seq;
    }
    uint64_t max_message() const { return shimmy_channel_max_message(h_.get()); }
    shimmy_channel *get() const noexcept { return h_.get(); }

  private:
    Handle<shimmy_channel, shimmy_channel_close> h_;
};

// Close a Subscription before its Channel (shimmy_channel_close closes what is left open).
class Subscription {
  public:
    explicit Subscription(const Channel &ch, shimmy_start start = SHIMMY_START_NEXT) {
        shimmy_sub *s = nullptr;
        check(shimmy_subscribe(ch.get(), start, &s));
        h_ = Handle<shimmy_sub, shimmy_sub_close>(s);
    }
    shimmy_message receive(double timeout = -1) {
        shimmy_message m;
        check(shimmy_receive(h_.get(), &m, timeout));
        return m;
    }
    size_t receive_copy(void *buf, size_t cap, double timeout = -1) {
        size_t len = 0;
        check(shimmy_receive_copy(h_.get(), buf, cap, &len, nullptr, timeout));
        return len;
    }
    void release() { shimmy_release(h_.get()); }
    uint64_t lost() const { return shimmy_sub_lost(h_.get()); }

  private:
    Handle<shimmy_sub, shimmy_sub_close> h_;
};

class Stream {
  public:
    Stream(const Client &client, const std::string &name, shimmy_role role,
           uint64_t capacity = 0) {
        shimmy_stream *s = nullptr;
        check(shimmy_stream_open(client.get(), name.c_str(), role, capacity, &s));
        h_ = Handle<shimmy_stream, shimmy_stream_close>(s);
    }
    void write(const void *data, size_t n, double timeout = -1) {
        check(shimmy_stream_write(h_.get(), data, n, timeout, nullptr));
    }
    size_t read(void *buf, size_t n, double timeout = -1) {   // 0: end of stream
        return static_cast<size_t>(check(shimmy_stream_read(h_.get(), buf, n, timeout)));
    }
    void close() { h_.reset(); }

  private:
    Handle<shimmy_stream, shimmy_stream_close> h_;
};

}  // namespace shimmy

#endif
