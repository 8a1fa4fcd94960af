// The raw C++ one-way handoff latency of a ring: the floor under any Python on top.
#pragma once

#include <cstdint>
#include <vector>

namespace shardline {

// Forks a reader process that runs only C++; the writer sends `iterations`
// messages of `payload_bytes`, each stamped with CLOCK_MONOTONIC, one at a time
// once the reader has drained the previous one. Returns the per-message
// one-way latency in nanoseconds as observed by the reader.
std::vector<int64_t> raw_handoff_latency(int64_t payload_bytes, int64_t iterations, int64_t n_slots,
                                         int64_t slot_size);

}  // namespace shardline
