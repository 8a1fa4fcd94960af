// The CPU kernels' worker threads, started once per process rather than once per call:
// starting and joining a std::thread took 20-30 us a call on a 2-core machine, as long as
// a short sequence's whole decode attention, and on a busy machine the call then waited
// for the new thread to get a core.
#pragma once

#include <cstddef>

namespace shardline::cpu {

// A task over the ranges [0, n): fn(context, range), from any thread.
struct RangeTask {
    void (*fn)(const void* context, size_t range);
    const void* context;
};

// Runs task for every range in [0, ranges) and returns once all are done: the calling
// thread takes ranges too, so a worker that is slow to wake leaves its range to the
// caller rather than holding the call up. The first exception a range throws is rethrown
// here, once no range is running. With fewer workers than asked for (threads the process
// cannot start), the caller runs the ranges left itself; while another thread's call has
// the workers, it runs all of its ranges itself. The workers are started as calls first
// need them; a process forked from one that has them starts its own.
void run_ranges(size_t ranges, RangeTask task);

// run_ranges over a callable taking the range; `fn` must outlive the call (it does: the
// call returns only once every range has ended).
template <class F>
void parallel_for(size_t ranges, const F& fn) {
    auto call = [](const void* f, size_t range) { (*static_cast<const F*>(f))(range); };
    run_ranges(ranges, RangeTask{call, &fn});
}

}  // namespace shardline::cpu
