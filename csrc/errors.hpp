// The C++ exceptions of the ring; bindings.cpp maps each to its Python type.
#pragma once

#include <stdexcept>
#include <string>

namespace shardline {

// A wait ended because someone called close() on the ring.
struct RingClosedError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// The process on the other side of the ring died.
struct PeerDiedError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// The ring's shared memory holds what no writer wrote (a slot header out of sequence or
// announcing an impossible size): a reader stops before allocating or copying anything.
struct RingCorruptedError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// A wait reached its deadline.
struct TimeoutError : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// A system call failed; carries errno so Python raises the matching OSError subclass.
struct OsError : std::runtime_error {
    OsError(int err, const std::string& what) : std::runtime_error(what), error(err) {}
    int error;
};

}  // namespace shardline
