// What the Python bindings of every blocking call share: a timeout in seconds (None waits
// forever) turned into a Deadline, and the hook that lets Ctrl-C end a wait.
#pragma once

#include <cmath>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>

#include <pybind11/pybind11.h>

#include "clock.hpp"

namespace shardline {

inline Deadline deadline_from(std::optional<double> timeout) {
    constexpr double kMaxTimeoutSeconds = 1e9;  // beyond this, waiting forever is the same
    if (!timeout) return Deadline::never();
    if (std::isnan(*timeout) || *timeout < 0) {
        throw std::invalid_argument("timeout must be None or a number of seconds >= 0, got " +
                                    std::to_string(*timeout));
    }
    if (*timeout >= kMaxTimeoutSeconds) return Deadline::never();
    return Deadline::after_ns(static_cast<int64_t>(*timeout * 1e9));
}

// Run from waits every ~100 ms with the GIL released: raises if a signal handler did.
inline void raise_pending_signals() {
    pybind11::gil_scoped_acquire gil;
    if (PyErr_CheckSignals() != 0) throw pybind11::error_already_set();
}

}  // namespace shardline
