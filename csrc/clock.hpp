// Monotonic time and wait deadlines.
#pragma once

#include <cstdint>
#include <ctime>
#include <limits>

namespace shardline {

inline int64_t monotonic_ns() {
    timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return static_cast<int64_t>(ts.tv_sec) * 1'000'000'000 + ts.tv_nsec;
}

// Sleeps about ns nanoseconds; a signal may end the sleep early.
inline void sleep_ns(int64_t ns) {
    timespec ts{static_cast<time_t>(ns / 1'000'000'000), static_cast<long>(ns % 1'000'000'000)};
    nanosleep(&ts, nullptr);
}

// The point in time at which a wait gives up; "never" for a wait without timeout.
class Deadline {
public:
    static Deadline never() { return Deadline(std::numeric_limits<int64_t>::max()); }
    static Deadline after_ns(int64_t ns) { return Deadline(monotonic_ns() + ns); }

    bool expired(int64_t now) const { return now >= at_ns_; }
    int64_t remaining_ns(int64_t now) const { return at_ns_ - now; }
    int64_t at_ns() const { return at_ns_; }

private:
    explicit Deadline(int64_t at_ns) : at_ns_(at_ns) {}
    int64_t at_ns_;
};

}  // namespace shardline
