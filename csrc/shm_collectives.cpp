#include "shm_collectives.hpp"

#include <algorithm>
#include <cstring>
#include <limits>
#include <sched.h>
#include <stdexcept>
#include <string>

#include <unistd.h>

#include "errors.hpp"
#include "futex.hpp"
#include "liveness.hpp"
#include "sweep.hpp"

namespace shardline {
namespace {

// Spinning covers a peer that is a few microseconds behind; yields inside the spin let
// a peer that shares this core run. After it, the wait sleeps on the futex.
constexpr int64_t kSpinNs = 20'000;
constexpr int64_t kSleepSliceNs = 100'000'000;
constexpr int64_t kLivenessIntervalNs = 100'000'000;
// All-reduce pieces at least this large, among more than two ranks, are reduced in
// two steps: each rank sums 1/n of the piece, then everyone copies the sums. That
// halves the arithmetic when ranks outnumber cores, for one more barrier.
constexpr uint64_t kTwoStepBytes = 256 * 1024;

enum OpKind : uint64_t { kAllReduce = 1, kAllGather = 2 };

uint64_t describe(OpKind kind, DType dtype) { return kind | (static_cast<uint64_t>(dtype) << 8); }

std::string describe_text(uint64_t op, uint64_t count) {
    if ((op & 0xff) == kAllGather) return "all_gather of " + std::to_string(count) + " bytes";
    return "all_reduce of " + std::to_string(count) + " " + dtype_name(static_cast<DType>(op >> 8)) +
           " elements";
}

void check_range(const char* argument, int64_t value, uint64_t low, uint64_t high) {
    if (value < 0 || static_cast<uint64_t>(value) < low || static_cast<uint64_t>(value) > high) {
        throw std::invalid_argument(std::string(argument) + " must be in [" + std::to_string(low) + ", " +
                                    std::to_string(high) + "], got " + std::to_string(value));
    }
}

uint64_t data_offset() { return align_up(sizeof(CollectiveLayout), kCacheLine); }

}  // namespace

ShmCollectives::ShmCollectives(Segment segment, int rank)
    : segment_(std::move(segment)),
      layout_(static_cast<CollectiveLayout*>(segment_.data())),
      data_(static_cast<char*>(segment_.data()) + data_offset()),
      name_(segment_.name()),
      n_ranks_(layout_->n_ranks),
      buffer_bytes_(layout_->buffer_bytes),
      rank_(rank),
      creator_pid_(rank == 0 ? getpid() : 0) {}

std::unique_ptr<ShmCollectives> ShmCollectives::create(int64_t n_ranks, int64_t buffer_bytes) {
    check_range("n_ranks", n_ranks, 2, kMaxCollectiveRanks);
    check_range("buffer_bytes", buffer_bytes, kCacheLine, kMaxCollectiveBuffer);
    if (buffer_bytes % kCacheLine != 0) {
        throw std::invalid_argument("buffer_bytes must be a multiple of " + std::to_string(kCacheLine) + ", got " +
                                    std::to_string(buffer_bytes));
    }
    uint64_t bytes = std::max<uint64_t>(data_offset() + 2 * n_ranks * buffer_bytes, sizeof(SegmentLayout));
    try {
        sweep_orphans();
    } catch (const OsError&) {
        // Best effort, as in Ring::create: shm_open below reports an unusable /dev/shm.
    }
    Segment segment = Segment::create(bytes, [&](void* data) {
        auto* layout = static_cast<CollectiveLayout*>(data);
        layout->collective_magic = kCollectiveMagic;
        layout->n_ranks = static_cast<uint32_t>(n_ranks);
        layout->buffer_bytes = static_cast<uint64_t>(buffer_bytes);
        layout->attached.store(1, std::memory_order_relaxed);
        SegmentHeader& h = layout->header;
        // A ring geometry that Ring::attach refuses (no slots), so the name cannot be
        // mistaken for a ring; the sweep reads only the creator identity.
        h.version = kVersion;
        h.n_readers = static_cast<uint32_t>(n_ranks - 1);
        h.n_slots = 0;
        h.slot_size = static_cast<uint64_t>(buffer_bytes);
        h.segment_bytes = bytes;
        h.writer_pid = getpid();
        h.writer_start_time = process_start_time(h.writer_pid);
        h.writer_pid_namespace = pid_namespace_id();
        h.magic.store(kMagic, std::memory_order_release);
    });
    std::unique_ptr<ShmCollectives> group(new ShmCollectives(std::move(segment), 0));
    group->record_identity();
    return group;
}

std::unique_ptr<ShmCollectives> ShmCollectives::attach(const std::string& name, int64_t rank) {
    Segment segment = Segment::open(name, sizeof(CollectiveLayout));
    auto* layout = static_cast<CollectiveLayout*>(segment.data());
    if (layout->header.magic.load(std::memory_order_acquire) != kMagic ||
        layout->collective_magic != kCollectiveMagic || layout->header.version != kVersion) {
        throw std::invalid_argument("name: segment '" + name + "' is not a shardline shared-memory collective group");
    }
    uint32_t n_ranks = layout->n_ranks;
    check_range("rank", rank, 1, n_ranks - 1);
    int32_t unclaimed = 0;
    if (!layout->ranks[rank].pid.compare_exchange_strong(unclaimed, -1, std::memory_order_acq_rel)) {
        throw std::invalid_argument("rank " + std::to_string(rank) + " of collective group '" + name +
                                    "' is already attached; each rank in [1, " + std::to_string(n_ranks - 1) +
                                    "] attaches once");
    }
    std::unique_ptr<ShmCollectives> group(new ShmCollectives(std::move(segment), static_cast<int>(rank)));
    group->record_identity();
    if (layout->attached.fetch_add(1, std::memory_order_acq_rel) + 1 == n_ranks) {
        Segment::unlink(name);
        layout->header.all_attached.store(1, std::memory_order_seq_cst);
    }
    layout->attach_wait.epoch.fetch_add(1, std::memory_order_seq_cst);
    futex_wake_all(&layout->attach_wait.epoch);
    return group;
}

ShmCollectives::~ShmCollectives() {
    if (creator_pid_ == getpid() && layout_->header.all_attached.load(std::memory_order_acquire) == 0) {
        Segment::unlink(name_);
    }
}

void ShmCollectives::record_identity() {
    CollectiveRankLine& line = layout_->ranks[rank_];
    pid_t pid = getpid();
    line.start_time.store(process_start_time(pid), std::memory_order_release);
    line.pid.store(pid, std::memory_order_release);
}

void ShmCollectives::check_peers(const char* what) const {
    for (uint32_t r = 0; r < n_ranks_; ++r) {
        const CollectiveRankLine& line = layout_->ranks[r];
        pid_t pid = line.pid.load(std::memory_order_acquire);
        if (static_cast<int>(r) == rank_ || pid <= 0) continue;
        if (!process_alive(pid, line.start_time.load(std::memory_order_acquire))) {
            throw PeerDiedError(std::string(what) + ": rank " + std::to_string(r) + " (pid " + std::to_string(pid) +
                                ") of shared-memory collective group '" + name_ + "' died");
        }
    }
}

template <class Ready, class Check>
void ShmCollectives::wait(WaitLine& line, Ready ready, Check check, const char* what) {
    int64_t spin_until = std::min(monotonic_ns() + kSpinNs, deadline_.at_ns());
    for (uint32_t i = 1;; ++i) {
        if (ready()) return;
        if (i % 64 == 0) {
            if (monotonic_ns() >= spin_until) break;
            sched_yield();
        }
        cpu_relax();
    }
    for (;;) {
        // Ready first: a step whose every contribution was published completes even if a
        // peer closed the group or died right after publishing.
        if (ready()) return;
        require_usable(what);
        int64_t now = monotonic_ns();
        if (now >= next_liveness_check_ns_) {
            next_liveness_check_ns_ = now + kLivenessIntervalNs;
            check_peers(what);
            check();
            if (interrupt_check_ != nullptr) interrupt_check_();
        }
        if (deadline_.expired(now)) {
            throw TimeoutError(std::string(what) + ": timed out on shared-memory collective group '" + name_ + "'");
        }
        int64_t sleep_ns = std::min({deadline_.remaining_ns(now), next_liveness_check_ns_ - now, kSleepSliceNs});
        // The same protocol as the rings' waits: sleepers is incremented before the
        // re-check, the waker changes the word before it reads sleepers.
        line.sleepers.fetch_add(1, std::memory_order_seq_cst);
        std::atomic_thread_fence(std::memory_order_seq_cst);
        uint32_t epoch = line.epoch.load(std::memory_order_seq_cst);
        if (!ready() && layout_->failed.load(std::memory_order_seq_cst) == 0) {
            futex_wait(&line.epoch, epoch, sleep_ns);
        }
        line.sleepers.fetch_sub(1, std::memory_order_seq_cst);
        if (ready()) return;
    }
}

void ShmCollectives::wait_attached(Deadline deadline, const std::vector<int64_t>& pids) {
    require_usable("wait_attached");
    if (!pids.empty() && pids.size() != n_ranks_) {
        throw std::invalid_argument("pids must list one process id per rank (" + std::to_string(n_ranks_) +
                                    "), got " + std::to_string(pids.size()));
    }
    std::vector<uint64_t> start_times;
    for (size_t r = 0; r < pids.size(); ++r) {
        std::string argument = "pids[" + std::to_string(r) + "]";
        check_range(argument.c_str(), pids[r], 1, std::numeric_limits<pid_t>::max());
        start_times.push_back(process_start_time(static_cast<pid_t>(pids[r])));
    }
    auto all = [this] { return layout_->attached.load(std::memory_order_acquire) == n_ranks_; };
    auto expected_alive = [&] {
        for (size_t r = 0; r < pids.size(); ++r) {
            auto pid = static_cast<pid_t>(pids[r]);
            if (layout_->ranks[r].pid.load(std::memory_order_acquire) == 0 && !process_alive(pid, start_times[r])) {
                throw PeerDiedError("wait_attached: rank " + std::to_string(r) + " (pid " + std::to_string(pid) +
                                    ") died before it attached to shared-memory collective group '" + name_ + "'");
            }
        }
    };
    deadline_ = deadline;
    guarded([&] { wait(layout_->attach_wait, all, expected_alive, "wait_attached"); });
}

void ShmCollectives::require_usable(const char* what) const {
    if (!broken_.empty()) {
        throw RingClosedError(std::string(what) + ": shared-memory collective group '" + name_ +
                              "' is unusable after an earlier failure: " + broken_);
    }
    if (closed_) {
        throw RingClosedError(std::string(what) + ": shared-memory collective group '" + name_ +
                              "' was closed on this rank");
    }
    // Acquire pairs with fail_group()'s release: the reason is complete.
    if (uint32_t failed = layout_->failed.load(std::memory_order_acquire); failed != 0) {
        // A dead peer is the likelier root cause; name it rather than the messenger.
        check_peers(what);
        throw RingClosedError(std::string(what) + ": shared-memory collective group '" + name_ +
                              "' was closed by rank " + std::to_string(failed - 1) + " after its collective failed (" +
                              std::string(layout_->failure_reason, strnlen(layout_->failure_reason,
                                                                           sizeof(layout_->failure_reason))) +
                              ")");
    }
}

void ShmCollectives::arrive_and_wait(const char* what) {
    WaitLine& line = layout_->arrivals;
    uint32_t target = (barriers_ + 1) * n_ranks_;
    // seq_cst: the staging copy and op description before it are published to every
    // rank that sees the count, and it is ordered before the sleepers load below.
    uint32_t arrived = line.epoch.fetch_add(1, std::memory_order_seq_cst) + 1;
    ++barriers_;
    if (arrived == target) {
        if (line.sleepers.load(std::memory_order_seq_cst) != 0) futex_wake_all(&line.epoch);
        return;
    }
    auto reached = [&] {
        return static_cast<int32_t>(line.epoch.load(std::memory_order_acquire) - target) >= 0;
    };
    wait(line, reached, [] {}, what);
}

void ShmCollectives::check_same_op(uint64_t op, uint64_t count, const char* what) const {
    for (uint32_t r = 0; r < n_ranks_; ++r) {
        const CollectiveRankLine& line = layout_->ranks[r];
        if (line.op[generation_] != op || line.count[generation_] != count) {
            throw std::invalid_argument(std::string(what) + ": rank " + std::to_string(rank_) + " runs " +
                                        describe_text(op, count) + " but rank " + std::to_string(r) + " runs " +
                                        describe_text(line.op[generation_], line.count[generation_]) +
                                        "; every rank must call the same collective with the same size");
        }
    }
}

void ShmCollectives::barrier(uint64_t op, uint64_t count, const char* what) {
    CollectiveRankLine& line = layout_->ranks[rank_];
    line.op[generation_] = op;
    line.count[generation_] = count;
    arrive_and_wait(what);
    check_same_op(op, count, what);
}

void ShmCollectives::fail_group(const std::string& reason) {
    uint32_t unclaimed = 0;
    if (layout_->failing.compare_exchange_strong(unclaimed, 1, std::memory_order_acq_rel)) {
        size_t n = std::min(reason.size(), sizeof(layout_->failure_reason) - 1);
        std::memcpy(layout_->failure_reason, reason.data(), n);
        layout_->failure_reason[n] = '\0';
        layout_->failed.store(1 + rank_, std::memory_order_seq_cst);
    }
    // The arrival count is left alone (only arrivals move it); a sleeper that missed
    // this wake sees the flag at the end of its sleep slice.
    futex_wake_all(&layout_->arrivals.epoch);
    layout_->attach_wait.epoch.fetch_add(1, std::memory_order_seq_cst);
    futex_wake_all(&layout_->attach_wait.epoch);
}

template <class Body>
void ShmCollectives::guarded(Body body) {
    try {
        body();
    } catch (const std::exception& error) {
        // The ranks are out of step now; the others must not wait for a barrier this
        // rank will never reach.
        broken_ = error.what();
        fail_group(broken_);
        throw;
    }
}

void ShmCollectives::all_reduce(void* data, uint64_t count, DType dtype, Deadline deadline) {
    require_usable("all_reduce");
    deadline_ = deadline;
    size_t elem = dtype_size(dtype);
    uint64_t op = describe(kAllReduce, dtype);
    uint64_t per_piece = buffer_bytes_ / elem;
    // Each rank's share of a two-step piece starts on a cache line of its own.
    uint64_t line_elems = kCacheLine / elem;
    guarded([&] {
        for (uint64_t start = 0; start < count || start == 0; start += per_piece) {
            uint64_t n = std::min(per_piece, count - start);
            char* out = static_cast<char*>(data) + start * elem;
            std::memcpy(buffer(generation_, rank_), out, n * elem);
            barrier(op, count, "all_reduce");
            const void* srcs[kMaxCollectiveRanks];
            if (n_ranks_ > 2 && n * elem >= kTwoStepBytes) {
                uint64_t share = align_up((n + n_ranks_ - 1) / n_ranks_, line_elems);
                uint64_t lo = std::min(n, rank_ * share), hi = std::min(n, lo + share);
                for (uint32_t r = 0; r < n_ranks_; ++r) srcs[r] = buffer(generation_, r) + lo * elem;
                srcs[rank_] = out + lo * elem;  // the same bits, without a trip through the copy
                sum_into(buffer(generation_, rank_) + lo * elem, srcs, n_ranks_, hi - lo, dtype);
                barrier(op, count, "all_reduce");
                for (uint32_t r = 0; r < n_ranks_; ++r) {
                    uint64_t r_lo = std::min(n, r * share), r_hi = std::min(n, r_lo + share);
                    std::memcpy(out + r_lo * elem, buffer(generation_, r) + r_lo * elem, (r_hi - r_lo) * elem);
                }
            } else {
                for (uint32_t r = 0; r < n_ranks_; ++r) srcs[r] = buffer(generation_, r);
                srcs[rank_] = out;
                sum_into(out, srcs, n_ranks_, n, dtype);
            }
            generation_ ^= 1;
            if (n == 0) break;
        }
    });
}

void ShmCollectives::all_gather(const void* input, void* out, uint64_t bytes, uint64_t inner, Deadline deadline) {
    require_usable("all_gather");
    if (bytes != 0 && (inner == 0 || bytes % inner != 0)) {
        throw std::invalid_argument("all_gather: inner=" + std::to_string(inner) + " must divide the " +
                                    std::to_string(bytes) + " input bytes");
    }
    deadline_ = deadline;
    uint64_t op = describe(kAllGather, DType::kFloat32);
    auto* dst = static_cast<char*>(out);
    const auto* src = static_cast<const char*>(input);
    uint64_t row = inner * n_ranks_;  // one outer index of the output: every rank's inner bytes
    guarded([&] {
        for (uint64_t start = 0; start < bytes || start == 0; start += buffer_bytes_) {
            uint64_t end = std::min(start + buffer_bytes_, bytes);
            std::memcpy(buffer(generation_, rank_), src + start, end - start);
            barrier(op, bytes, "all_gather");
            for (uint32_t r = 0; r < n_ranks_; ++r) {
                const char* from = static_cast<int>(r) == rank_ ? src + start : buffer(generation_, r);
                // Input bytes [start, end) of rank r, cut where an inner block ends.
                for (uint64_t pos = start; pos < end;) {
                    uint64_t outer = pos / inner, offset = pos % inner;
                    uint64_t length = std::min(inner - offset, end - pos);
                    char* to = dst + outer * row + r * inner + offset;
                    if (to != from + (pos - start)) std::memcpy(to, from + (pos - start), length);
                    pos += length;
                }
            }
            generation_ ^= 1;
            if (end == bytes) break;
        }
    });
}

void ShmCollectives::close() {
    if (closed_.exchange(true)) return;
    // Only this rank's handle closes: a peer may still be finishing the last collective,
    // whose barrier this rank already passed. Waits of this process's other threads wake.
    futex_wake_all(&layout_->arrivals.epoch);
    futex_wake_all(&layout_->attach_wait.epoch);
    if (creator_pid_ == getpid() && layout_->header.all_attached.load(std::memory_order_acquire) == 0) {
        Segment::unlink(name_);
    }
}

}  // namespace shardline
