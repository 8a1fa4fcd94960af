#include "thread_pool.hpp"

#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <exception>
#include <mutex>
#include <thread>
#include <utility>

namespace shardline::cpu {
namespace {

// Workers sleep on a condition variable between calls. A call publishes its task under
// the mutex, wakes as many workers as it has ranges beyond its own, and then claims
// ranges itself from a shared counter alongside them; it returns once every worker that
// joined the call has left it. A worker that wakes after the call has ended joins
// nothing and sleeps again.
class ThreadPool {
public:
    // The process whose workers these are: a forked child has none of them.
    const pid_t owner = getpid();

    // Runs every range, or nothing and returns false while another call has the workers.
    bool try_run(size_t ranges, RangeTask task) {
        std::unique_lock<std::mutex> call(calls_, std::try_to_lock);
        if (!call.owns_lock()) return false;
        const size_t helpers = start_workers(ranges - 1);
        {
            std::lock_guard<std::mutex> lock(mutex_);
            task_ = task;
            ranges_ = ranges;
            next_.store(0, std::memory_order_relaxed);
            open_ = true;
            ++generation_;
        }
        for (size_t i = 0; i < helpers; ++i) wake_.notify_one();
        take_ranges();
        std::exception_ptr error;
        {
            std::unique_lock<std::mutex> lock(mutex_);
            open_ = false;
            done_.wait(lock, [this] { return joined_ == 0; });
            error = std::exchange(error_, nullptr);
        }
        if (error) std::rethrow_exception(error);
        return true;
    }

private:
    // Up to `wanted` workers in all, as many as the process can start now; the ranges of
    // those it cannot fall to the caller, and a later call tries again.
    size_t start_workers(size_t wanted) {
        for (; workers_ < wanted; ++workers_) {
            try {
                std::thread([this] { work(); }).detach();
            } catch (const std::exception&) {
                break;
            }
        }
        return std::min(workers_, wanted);
    }

    // Detached and never ended: the pool is never destroyed, and a worker asleep at
    // process exit ends with the process.
    void work() {
        uint64_t seen = 0;
        for (;;) {
            {
                std::unique_lock<std::mutex> lock(mutex_);
                wake_.wait(lock, [&] { return open_ && generation_ != seen; });
                seen = generation_;
                ++joined_;
            }
            take_ranges();
            std::lock_guard<std::mutex> lock(mutex_);
            if (--joined_ == 0) done_.notify_one();
        }
    }

    // Claims and runs ranges until none is left. task_, ranges_ and next_'s reset were
    // written under mutex_, which this thread has held since (a worker joining, or the
    // caller publishing), and stay as they are until every joined worker has left: plain
    // reads, and relaxed claims (only their atomicity matters). What the task writes
    // reaches the caller through the mutex, released as a worker leaves and acquired by
    // the caller's wait.
    void take_ranges() {
        for (size_t range; (range = next_.fetch_add(1, std::memory_order_relaxed)) < ranges_;) {
            try {
                task_.fn(task_.context, range);
            } catch (...) {
                std::lock_guard<std::mutex> lock(mutex_);
                if (!error_) error_ = std::current_exception();
            }
        }
    }

    std::mutex calls_;  // held by the call that has the workers
    size_t workers_ = 0;  // started; read and written by the call holding calls_
    std::mutex mutex_;
    std::condition_variable wake_, done_;
    std::atomic<size_t> next_{0};  // the next range to claim; reset under mutex_
    // Under mutex_:
    RangeTask task_{};
    size_t ranges_ = 0;
    bool open_ = false;  // workers may join the current call
    uint64_t generation_ = 0;  // calls published
    size_t joined_ = 0;  // workers in the current call
    std::exception_ptr error_;  // the first a range threw
};

std::atomic<ThreadPool*> g_pool{nullptr};

ThreadPool& process_pool() {
    ThreadPool* pool = g_pool.load(std::memory_order_acquire);
    if (pool != nullptr && pool->owner == getpid()) return *pool;
    // None yet, or one this process inherited through fork without its workers: a new
    // one. An inherited one is left untouched (a thread that is gone may hold its mutexes).
    ThreadPool* fresh = new ThreadPool;
    if (g_pool.compare_exchange_strong(pool, fresh, std::memory_order_acq_rel)) return *fresh;
    delete fresh;  // another thread of this process installed one first; no worker started
    return *pool;
}

}  // namespace

void run_ranges(size_t ranges, RangeTask task) {
    if (ranges > 1 && process_pool().try_run(ranges, task)) return;
    for (size_t range = 0; range < ranges; ++range) task.fn(task.context, range);
}

}  // namespace shardline::cpu
