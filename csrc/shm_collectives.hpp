// All-reduce and all-gather among the processes of one machine over one shared segment.
//
// Every rank maps the same segment: a header, one control line per rank and, for each
// of two generations, one staging buffer per rank. A collective copies this rank's
// input into its buffer, meets the others at a barrier (a shared arrival counter that
// doubles as the futex word), then reads what it needs from every buffer. The two
// generations alternate, so the next collective's writes never race the previous
// one's reads without a second barrier. Inputs larger than a buffer go through in
// buffer-sized pieces.
//
// The segment follows the rings' rules: O_EXCL, mode 0600, an unguessable name,
// unlinked by the last rank to attach (or by the creator if that never happens), and
// it starts with the rings' SegmentHeader so sweep_orphans() removes it when the
// creator was killed before everyone attached. Waits spin briefly, yield, then sleep
// on the futex; they notice a dead peer within about 0.1 s, a close(), and a deadline.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "clock.hpp"
#include "layout.hpp"
#include "segment.hpp"
#include "shm_reduce.hpp"

namespace shardline {

inline constexpr uint32_t kMaxCollectiveRanks = 64;
inline constexpr uint64_t kMaxCollectiveBuffer = 256ull << 20;

// This rank's identity and the description of the collective it is in, per generation.
struct alignas(kCacheLine) CollectiveRankLine {
    std::atomic<int32_t> pid;  // 0 until the rank attaches, -1 while it records its identity
    std::atomic<uint64_t> start_time;
    uint64_t op[2];  // what this rank is doing in each generation (see describe())
    uint64_t count[2];
};

inline constexpr uint64_t kCollectiveMagic = 0x6c6c6f436c64726bULL;  // "krdlColl" little-endian

struct CollectiveLayout {
    SegmentHeader header;  // the rings' header: magic, version and creator identity for the sweep
    alignas(kCacheLine) uint64_t collective_magic;
    uint32_t n_ranks;
    uint64_t buffer_bytes;
    std::atomic<uint32_t> attached;
    std::atomic<uint32_t> failing;  // claimed by the first rank whose collective failed
    std::atomic<uint32_t> failed;   // then 1 + that rank, once failure_reason is written
    char failure_reason[256];
    WaitLine arrivals;  // epoch counts every barrier arrival ever; ranks sleep on it
    WaitLine attach_wait;
    CollectiveRankLine ranks[kMaxCollectiveRanks];
};

class ShmCollectives {
public:
    // Rank 0: creates the segment for n_ranks ranks with buffer_bytes per rank per generation.
    static std::unique_ptr<ShmCollectives> create(int64_t n_ranks, int64_t buffer_bytes);
    // Ranks 1..n_ranks-1: attach to the segment `name`; the last one unlinks the name.
    static std::unique_ptr<ShmCollectives> attach(const std::string& name, int64_t rank);
    ~ShmCollectives();
    ShmCollectives(const ShmCollectives&) = delete;
    ShmCollectives& operator=(const ShmCollectives&) = delete;

    const std::string& name() const { return name_; }
    int rank() const { return rank_; }
    uint32_t n_ranks() const { return n_ranks_; }
    uint64_t buffer_bytes() const { return buffer_bytes_; }

    // Waits until every rank attached. pids (one per rank, in rank order, or empty)
    // turn the death of a rank that has not attached yet into PeerDiedError.
    void wait_attached(Deadline deadline, const std::vector<int64_t>& pids);
    // Sums `count` elements at data over all ranks, in place; every rank gets the same
    // bits (the sum runs in rank order, in fp32 for 16-bit floats).
    void all_reduce(void* data, uint64_t count, DType dtype, Deadline deadline);
    // Every rank's `bytes` input, seen as [outer][inner] (inner bytes per block), lands in
    // out as [outer][n_ranks][inner]: a concatenation along any dimension in one pass.
    // inner = bytes gives the plain [n_ranks][bytes] layout.
    void all_gather(const void* input, void* out, uint64_t bytes, uint64_t inner, Deadline deadline);
    // Closes this rank's handle: its later calls raise and this process's waiters wake.
    // Peers are not told (they may still finish the last collective); they notice when
    // this process exits, or when a collective of this rank fails, which closes the group
    // for everyone. Idempotent.
    void close();

    // A hook run from waits at most every 100 ms (e.g. to let Ctrl-C through); it may
    // throw to abandon the wait.
    using InterruptCheck = void (*)();
    void set_interrupt_check(InterruptCheck check) { interrupt_check_ = check; }

private:
    ShmCollectives(Segment segment, int rank);
    char* buffer(uint32_t generation, uint32_t rank) const {
        return data_ + (static_cast<uint64_t>(generation) * n_ranks_ + rank) * buffer_bytes_;
    }
    void record_identity();
    void require_usable(const char* what) const;
    // Publishes what this rank does in the current generation, arrives, waits for all,
    // then checks that every rank does the same thing.
    void barrier(uint64_t op, uint64_t count, const char* what);
    void arrive_and_wait(const char* what);
    template <class Ready, class Check>
    void wait(WaitLine& line, Ready ready, Check check, const char* what);
    void check_peers(const char* what) const;
    void check_same_op(uint64_t op, uint64_t count, const char* what) const;
    void fail_group(const std::string& reason);
    template <class Body>
    void guarded(Body body);

    Segment segment_;
    CollectiveLayout* layout_;
    char* data_;
    std::string name_;
    uint32_t n_ranks_;
    uint64_t buffer_bytes_;
    int rank_;
    pid_t creator_pid_;  // 0 except in the creating process
    uint32_t generation_ = 0;  // which staging buffers the next collective uses
    uint32_t barriers_ = 0;    // barriers this rank has passed (mod 2^32)
    Deadline deadline_ = Deadline::never();
    int64_t next_liveness_check_ns_ = 0;
    std::atomic<bool> closed_{false};
    std::string broken_;  // why an earlier collective failed; the group is unusable after it
    InterruptCheck interrupt_check_ = nullptr;
};

}  // namespace shardline
