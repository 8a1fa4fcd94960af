// A lock-free one-writer, N-reader broadcast ring over POSIX shared memory.
//
// The writer publishes slots by advancing one sequence cursor; each reader owns a
// cursor of its own and the writer reuses a slot only once every reader's cursor
// has passed it. Messages span as many consecutive slots as they need, so a
// message may be larger than the whole ring (up to kMaxMessageBytes, 4 GiB): the
// writer streams it as the readers drain. A reader checks the size a message's first
// slot announces before it allocates for it, and raises on a corrupt one. One Ring
// object is one side (the writer or one reader) and is not meant to be used by two
// threads at the same time.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <sys/types.h>

#include "clock.hpp"
#include "layout.hpp"
#include "segment.hpp"

namespace shardline {

// One contiguous piece of a message being written.
struct Part {
    const char* data;
    size_t bytes;
};

class Ring {
public:
    // Creates a new segment; the caller becomes the writer. First removes what writers
    // killed before their readers attached left in /dev/shm (see sweep_orphans()).
    static std::unique_ptr<Ring> create(int64_t n_readers, int64_t n_slots, int64_t slot_size);
    // Attaches to an existing segment as reader `reader_index`; the last reader to
    // attach removes the name from /dev/shm.
    static std::unique_ptr<Ring> attach(const std::string& name, int64_t reader_index);
    ~Ring();
    Ring(const Ring&) = delete;
    Ring& operator=(const Ring&) = delete;

    const std::string& name() const { return name_; }
    uint32_t n_readers() const { return n_readers_; }
    uint64_t n_slots() const { return n_slots_; }
    uint64_t slot_size() const { return slot_size_; }
    int reader_index() const { return reader_index_; }
    bool is_writer() const { return reader_index_ < 0; }

    // Writer side.
    // True when write() of a message this large would not wait.
    bool can_write_now(uint64_t message_bytes);
    // Writes one message, the concatenation of parts. On a timeout after part of
    // the message was published, the next write first tells readers to drop it.
    // Raises std::logic_error until every reader has attached (see wait_attached()).
    void write(const Part* parts, size_t n_parts, Deadline deadline);
    // Waits until every reader has attached. With reader_pids (the processes expected
    // to attach, each listed once), raises PeerDiedError once one of them is dead
    // while a reader is still missing, instead of waiting for the deadline.
    void wait_attached(Deadline deadline, const std::vector<int64_t>& reader_pids);
    // True when every reader has consumed everything written so far.
    bool drained();

    // Reader side: begin a message (learn its size), then read its body.
    // Returns the size of the next message if its first slot is already readable.
    std::optional<uint64_t> poll_message();
    uint64_t begin_message(Deadline deadline);
    // True when the rest of the current message is readable without waiting.
    bool message_ready();
    // Copies the rest of the current message into dst (which holds message_bytes).
    // Resumable after a TimeoutError. Returns false if the writer aborted the message.
    bool read_body(char* dst, Deadline deadline);
    // Records the calling process as this reader, for a reader handed over by fork().
    void adopt_current_process();

    // Marks the ring closed for every side and wakes all waiters. Idempotent. Waiters
    // first receive everything published before the close, then raise RingClosedError.
    // Destroying the end closes it too, in the process that owns the end (the writer's
    // creator, or the process a reader last recorded): a forked copy does not close.
    void close();

    // A hook run from waits at most every 100 ms (e.g. to let Ctrl-C through); it
    // may throw to abandon the wait, like a timeout.
    using InterruptCheck = void (*)();
    void set_interrupt_check(InterruptCheck check) { interrupt_check_ = check; }

    // For tests of races at the end of the spin phase: every wait of this process that
    // outlasts its spin sleeps `ns` more before its first look at close and liveness,
    // widening that window from nanoseconds to whatever a test needs. 0 turns it off.
    static void set_pause_after_spin_for_tests(int64_t ns);

private:
    // A process named by pid and start time, so that a reused pid does not pass for it.
    struct Peer {
        pid_t pid;
        uint64_t start_time;
    };

    Ring(Segment segment, int reader_index);

    SlotHeader* slot(uint64_t seq) const {
        return reinterpret_cast<SlotHeader*>(slots_ + (seq % n_slots_) * slot_stride_);
    }
    static char* payload(SlotHeader* slot) { return reinterpret_cast<char*>(slot + 1); }
    static const char* payload(const SlotHeader* slot) { return reinterpret_cast<const char*>(slot + 1); }
    uint64_t slots_for(uint64_t message_bytes) const;
    uint64_t min_read_seq() const;
    bool has_space(uint64_t slots);
    bool published(uint64_t seq);
    void publish_slot(uint64_t message_bytes, uint32_t bytes, uint32_t flags);
    void consume_slot();
    const SlotHeader* checked_slot(uint64_t seq) const;
    void check_first_slot(const SlotHeader* s) const;
    void notify(WaitLine& line);
    template <class Ready>
    void wait(WaitLine& line, Deadline deadline, Ready ready, const char* what) {
        wait(line, deadline, ready, [] {}, what);
    }
    // Also runs check() with every peer liveness check; it throws to end the wait.
    template <class Ready, class Check>
    void wait(WaitLine& line, Deadline deadline, Ready ready, Check check, const char* what);
    void check_peers();
    std::vector<Peer> expected_readers(const std::vector<int64_t>& reader_pids) const;
    void record_identity();
    void unlink_if_creator();
    void require_writer(const char* method) const;
    void require_reader(const char* method) const;
    void require_open(const char* method) const;
    void require_all_attached(const char* method);
    bool owned_by_this_process() const;

    Segment segment_;
    SegmentLayout* layout_;
    char* slots_;
    std::string name_;
    uint32_t n_readers_;
    uint64_t n_slots_;
    uint64_t slot_size_;
    uint64_t slot_stride_;
    int reader_index_;
    pid_t creator_pid_;  // 0 for readers; a forked copy of the writer does not own the name
    std::atomic<bool> closed_{false};  // close() may run on another thread than a waiter
    int64_t next_liveness_check_ns_ = 0;
    InterruptCheck interrupt_check_ = nullptr;

    // Writer state.
    bool all_attached_ = false;
    uint64_t write_seq_ = 0;
    uint64_t known_min_read_ = 0;
    bool pending_abort_ = false;

    // Reader state.
    uint64_t read_seq_ = 0;
    uint64_t known_write_seq_ = 0;
    bool in_message_ = false;
    uint64_t message_bytes_ = 0;
    uint64_t message_slots_ = 0;
    uint64_t slots_done_ = 0;
    uint64_t bytes_done_ = 0;
};

}  // namespace shardline
