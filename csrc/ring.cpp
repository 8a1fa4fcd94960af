// Writing, reading and waiting: the hot path of the ring.
#include "ring.hpp"

#include <algorithm>
#include <cstring>
#include <sched.h>
#include <stdexcept>
#include <string>

#include <unistd.h>

#include "errors.hpp"
#include "futex.hpp"
#include "liveness.hpp"

namespace shardline {
namespace {

// Spinning this long covers a peer that is about to act without a system call;
// after it, waiting costs nothing but the futex.
constexpr int64_t kSpinNs = 50'000;
// Sleep slices are bounded so the closed flag and peer liveness are rechecked.
constexpr int64_t kSleepSliceNs = 100'000'000;
constexpr int64_t kLivenessIntervalNs = 100'000'000;

std::atomic<int64_t> pause_after_spin_ns{0};

}  // namespace

void Ring::set_pause_after_spin_for_tests(int64_t ns) { pause_after_spin_ns.store(ns, std::memory_order_relaxed); }

uint64_t Ring::slots_for(uint64_t message_bytes) const {
    return message_bytes == 0 ? 1 : (message_bytes + slot_size_ - 1) / slot_size_;
}

uint64_t Ring::min_read_seq() const {
    uint64_t low = UINT64_MAX;
    for (uint32_t i = 0; i < n_readers_; ++i) {
        // Acquire pairs with the reader's store in consume_slot(): its copy out of
        // the slot happens-before our overwrite of it.
        low = std::min(low, layout_->readers[i].seq.load(std::memory_order_acquire));
    }
    return low;
}

bool Ring::has_space(uint64_t slots) {
    if (write_seq_ + slots <= known_min_read_ + n_slots_) return true;
    known_min_read_ = min_read_seq();
    return write_seq_ + slots <= known_min_read_ + n_slots_;
}

bool Ring::published(uint64_t seq) {
    if (seq < known_write_seq_) return true;
    // Acquire pairs with the writer's store in publish_slot(): the slot header and
    // payload written before it are visible once we see the new cursor.
    known_write_seq_ = layout_->write.seq.load(std::memory_order_acquire);
    return seq < known_write_seq_;
}

void Ring::notify(WaitLine& line) {
    // Together with the seq_cst cursor store before it and the waiter's seq_cst store
    // of the flag before its re-check, either we see the flag or the waiter sees the
    // new cursor, so no wake-up is lost. The waker, not the waiter, clears the flag:
    // a waiter killed in its sleep then costs one spare wake instead of one on every
    // later publish, and a waiter that wakes and must sleep again raises it again
    // before its re-check. Of several wakers only the one that clears it wakes.
    if (line.sleepers.load(std::memory_order_seq_cst) != 0 &&
        line.sleepers.exchange(0, std::memory_order_seq_cst) != 0) {
        line.epoch.fetch_add(1, std::memory_order_seq_cst);
        futex_wake_all(&line.epoch);
    }
}

void Ring::publish_slot(uint64_t message_bytes, uint32_t bytes, uint32_t flags) {
    SlotHeader* s = slot(write_seq_);
    s->seq = write_seq_;
    s->message_bytes = message_bytes;
    s->bytes = bytes;
    s->flags = flags;
    ++write_seq_;
    // Release publishes the slot to readers (see published()); seq_cst orders the
    // store before notify()'s flag load.
    layout_->write.seq.store(write_seq_, std::memory_order_seq_cst);
    notify(layout_->data_wait);
}

void Ring::consume_slot() {
    ++read_seq_;
    // Release hands the slot back to the writer (see min_read_seq()); seq_cst
    // orders the store before notify()'s flag load.
    layout_->readers[reader_index_].seq.store(read_seq_, std::memory_order_seq_cst);
    notify(layout_->space_wait);
}

const SlotHeader* Ring::checked_slot(uint64_t seq) const {
    const SlotHeader* s = slot(seq);
    if (s->seq != seq || s->bytes > slot_size_) {
        throw RingCorruptedError("ring '" + name_ + "' is corrupted: slot for sequence " + std::to_string(seq) +
                                 " holds sequence " + std::to_string(s->seq) + " with " +
                                 std::to_string(s->bytes) + " bytes");
    }
    return s;
}

void Ring::check_first_slot(const SlotHeader* s) const {
    // The size sizes the reader's buffer: it must be one a writer could have sent, and
    // agree with the first slot's own payload and flags, before anything is allocated.
    uint64_t first_bytes = std::min(slot_size_, s->message_bytes);
    bool last = s->message_bytes <= slot_size_;
    if (s->message_bytes > kMaxMessageBytes || s->bytes != first_bytes || last != ((s->flags & kLast) != 0)) {
        throw RingCorruptedError("ring '" + name_ + "' is corrupted: the first slot of the message at sequence " +
                                 std::to_string(s->seq) + " announces " + std::to_string(s->message_bytes) +
                                 " bytes (at most " + std::to_string(kMaxMessageBytes) + ") but holds " +
                                 std::to_string(s->bytes) + (s->flags & kLast ? " as the last slot" : "") +
                                 " in slots of " + std::to_string(slot_size_));
    }
}

void Ring::check_peers() {
    if (is_writer()) {
        for (uint32_t i = 0; i < n_readers_; ++i) {
            const ReaderLine& line = layout_->readers[i];
            if (line.attached.load(std::memory_order_acquire) == 0) continue;
            // Acquire pairs with the release stores in record_identity(): a start time
            // read after a pid belongs to that pid unless the pid changed meanwhile.
            pid_t pid = line.pid.load(std::memory_order_acquire);
            uint64_t start_time = line.start_time.load(std::memory_order_acquire);
            if (pid != line.pid.load(std::memory_order_acquire)) continue;
            if (!process_alive(pid, start_time)) {
                throw PeerDiedError("reader " + std::to_string(i) + " (pid " + std::to_string(pid) +
                                    ") of ring '" + name_ + "' died");
            }
        }
    } else {
        pid_t pid = layout_->header.writer_pid;
        if (!process_alive(pid, layout_->header.writer_start_time)) {
            throw PeerDiedError("the writer (pid " + std::to_string(pid) + ") of ring '" + name_ + "' died");
        }
    }
}

template <class Ready, class Check>
void Ring::wait(WaitLine& line, Deadline deadline, Ready ready, Check check, const char* what) {
    int64_t spin_until = std::min(monotonic_ns() + kSpinNs, deadline.at_ns());
    for (uint32_t i = 1;; ++i) {
        if (ready()) return;
        if (i % 64 == 0) {
            if (monotonic_ns() >= spin_until) break;
            // When the peer shares this core, pure spinning would hold the core for
            // the whole spin window; yielding lets the peer run and publish.
            sched_yield();
        }
        cpu_relax();
    }
    if (int64_t pause = pause_after_spin_ns.load(std::memory_order_relaxed); pause > 0) sleep_ns(pause);
    for (;;) {
        // Everything published before a close, or before a peer's death, is delivered
        // first: the flag is read before ready(), and a death is confirmed before a last
        // ready(). A side publishes before it closes, so the acquire load that sees the
        // flag also makes what it published visible to ready().
        bool closed = closed_ || layout_->header.closed.load(std::memory_order_acquire) != 0;
        if (ready()) return;
        if (closed) throw RingClosedError(std::string(what) + ": ring '" + name_ + "' was closed");
        int64_t now = monotonic_ns();
        if (now >= next_liveness_check_ns_) {
            next_liveness_check_ns_ = now + kLivenessIntervalNs;
            try {
                check_peers();
                check();
            } catch (const PeerDiedError&) {
                if (ready()) return;
                throw;
            }
            if (interrupt_check_ != nullptr) interrupt_check_();
        }
        if (deadline.expired(now)) {
            throw TimeoutError(std::string(what) + ": timed out on ring '" + name_ + "'");
        }
        int64_t slice_ns = std::min({deadline.remaining_ns(now), next_liveness_check_ns_ - now, kSleepSliceNs});
        // The fence orders the flag before ready()'s acquire loads, the mirror of the
        // waker's seq_cst cursor store before its flag load (see notify()).
        line.sleepers.store(1, std::memory_order_seq_cst);
        std::atomic_thread_fence(std::memory_order_seq_cst);
        uint32_t epoch = line.epoch.load(std::memory_order_seq_cst);
        if (!ready() && layout_->header.closed.load(std::memory_order_seq_cst) == 0) {
            futex_wait(&line.epoch, epoch, slice_ns);
        }
    }
}

void Ring::require_writer(const char* method) const {
    if (!is_writer()) {
        throw std::logic_error(std::string(method) + " is for the writer; this is reader " +
                               std::to_string(reader_index_) + " of ring '" + name_ + "'");
    }
}

void Ring::require_reader(const char* method) const {
    if (is_writer()) {
        throw std::logic_error(std::string(method) + " is for a reader; this is the writer of ring '" + name_ + "'");
    }
}

void Ring::require_open(const char* method) const {
    if (closed_) throw RingClosedError(std::string(method) + ": ring '" + name_ + "' was closed");
}

void Ring::require_all_attached(const char* method) {
    if (all_attached_) return;
    all_attached_ = layout_->header.all_attached.load(std::memory_order_acquire) != 0;
    if (all_attached_) return;
    std::string missing;
    for (uint32_t i = 0; i < n_readers_; ++i) {
        if (layout_->readers[i].attached.load(std::memory_order_acquire) == 0) {
            missing += (missing.empty() ? "" : ", ") + std::to_string(i);
        }
    }
    // A reader that died before attaching would leave the writer waiting forever once
    // the ring fills; wait_attached(reader_pids=...) is the wait that notices such a death.
    throw std::logic_error(std::string(method) + ": ring '" + name_ + "' has " +
                           std::to_string(layout_->header.attached_readers.load(std::memory_order_acquire)) + " of " +
                           std::to_string(n_readers_) + " readers attached (missing: " + missing +
                           "); call wait_attached(timeout, reader_pids=[the reader processes]) before the first "
                           "write, so that a reader that dies before attaching raises PeerDied instead of "
                           "blocking the writer forever");
}

bool Ring::can_write_now(uint64_t message_bytes) {
    return !closed_ && !pending_abort_ && has_space(slots_for(message_bytes));
}

void Ring::write(const Part* parts, size_t n_parts, Deadline deadline) {
    require_writer("write");
    require_open("write");
    if (layout_->header.closed.load(std::memory_order_acquire) != 0) {
        throw RingClosedError("write: ring '" + name_ + "' was closed");
    }
    require_all_attached("write");
    auto space = [this] { return has_space(1); };
    if (pending_abort_) {
        wait(layout_->space_wait, deadline, space, "write");
        publish_slot(0, 0, kAbort);
        pending_abort_ = false;
    }
    uint64_t total = 0;
    for (size_t i = 0; i < n_parts; ++i) total += parts[i].bytes;
    if (total > kMaxMessageBytes) {
        throw std::invalid_argument("write: a message of " + std::to_string(total) + " bytes is larger than a ring " +
                                    "carries (at most " + std::to_string(kMaxMessageBytes) + " bytes)");
    }
    uint64_t n_slots = slots_for(total);
    size_t part = 0;
    size_t part_offset = 0;
    for (uint64_t k = 0; k < n_slots; ++k) {
        try {
            wait(layout_->space_wait, deadline, space, "write");
        } catch (...) {
            pending_abort_ = k > 0;
            throw;
        }
        uint64_t bytes = std::min(slot_size_, total - k * slot_size_);
        char* dst = payload(slot(write_seq_));
        for (uint64_t filled = 0; filled < bytes;) {
            size_t chunk = std::min<uint64_t>(parts[part].bytes - part_offset, bytes - filled);
            std::memcpy(dst + filled, parts[part].data + part_offset, chunk);
            filled += chunk;
            part_offset += chunk;
            if (part_offset == parts[part].bytes) {
                ++part;
                part_offset = 0;
            }
        }
        uint32_t flags = (k == 0 ? kFirst : 0) | (k + 1 == n_slots ? kLast : 0);
        publish_slot(total, static_cast<uint32_t>(bytes), flags);
    }
}

void Ring::wait_attached(Deadline deadline, const std::vector<int64_t>& reader_pids) {
    require_writer("wait_attached");
    require_open("wait_attached");
    std::vector<Peer> expected = expected_readers(reader_pids);
    auto all = [this] { return layout_->header.all_attached.load(std::memory_order_acquire) != 0; };
    auto expected_alive = [&] {
        for (const Peer& peer : expected) {
            // all() again: a reader that attached and then exited did its part.
            if (!process_alive(peer.pid, peer.start_time) && !all()) {
                throw PeerDiedError("wait_attached: reader process " + std::to_string(peer.pid) +
                                    " (from reader_pids) died before ring '" + name_ + "' had all its readers (" +
                                    std::to_string(layout_->header.attached_readers.load()) + " of " +
                                    std::to_string(n_readers_) + " attached)");
            }
        }
    };
    wait(layout_->attach_wait, deadline, all, expected_alive, "wait_attached");
}

bool Ring::drained() {
    require_writer("drained");
    known_min_read_ = min_read_seq();
    return known_min_read_ == write_seq_;
}

std::optional<uint64_t> Ring::poll_message() {
    require_reader("read");
    require_open("read");
    while (!in_message_) {
        if (!published(read_seq_)) return std::nullopt;
        const SlotHeader* s = checked_slot(read_seq_);
        if (s->flags & kAbort) {
            consume_slot();
            continue;
        }
        if (!(s->flags & kFirst)) {
            throw RingCorruptedError("ring '" + name_ + "' is corrupted: sequence " + std::to_string(read_seq_) +
                                     " continues a message that never started");
        }
        check_first_slot(s);
        in_message_ = true;
        message_bytes_ = s->message_bytes;
        message_slots_ = slots_for(message_bytes_);
        slots_done_ = 0;
        bytes_done_ = 0;
    }
    return message_bytes_;
}

uint64_t Ring::begin_message(Deadline deadline) {
    for (;;) {
        if (auto bytes = poll_message()) return *bytes;
        wait(layout_->data_wait, deadline, [this] { return published(read_seq_); }, "read");
    }
}

bool Ring::message_ready() {
    return in_message_ && published(read_seq_ + (message_slots_ - slots_done_) - 1);
}

bool Ring::read_body(char* dst, Deadline deadline) {
    require_reader("read");
    require_open("read");
    auto readable = [this] { return published(read_seq_); };
    while (slots_done_ < message_slots_) {
        wait(layout_->data_wait, deadline, readable, "read");
        const SlotHeader* s = checked_slot(read_seq_);
        if (s->flags & kAbort) {
            consume_slot();
            in_message_ = false;
            return false;
        }
        bool last = slots_done_ + 1 == message_slots_;
        if ((slots_done_ > 0 && (s->flags & kFirst)) || last != ((s->flags & kLast) != 0) ||
            s->message_bytes != message_bytes_ || bytes_done_ + s->bytes > message_bytes_) {
            throw RingCorruptedError("ring '" + name_ + "' is corrupted at sequence " + std::to_string(read_seq_) +
                                     ": slot does not continue the current message");
        }
        std::memcpy(dst + bytes_done_, payload(s), s->bytes);
        bytes_done_ += s->bytes;
        ++slots_done_;
        consume_slot();
    }
    in_message_ = false;
    return true;
}

void Ring::record_identity() {
    ReaderLine& line = layout_->readers[reader_index_];
    pid_t pid = getpid();
    line.pid.store(0, std::memory_order_release);
    line.start_time.store(process_start_time(pid), std::memory_order_release);
    line.pid.store(pid, std::memory_order_release);
}

void Ring::adopt_current_process() {
    require_reader("adopt_current_process");
    record_identity();
}

void Ring::close() {
    if (closed_.exchange(true)) return;
    layout_->header.closed.store(1, std::memory_order_seq_cst);
    for (WaitLine* line : {&layout_->data_wait, &layout_->space_wait, &layout_->attach_wait}) {
        line->epoch.fetch_add(1, std::memory_order_seq_cst);
        futex_wake_all(&line->epoch);
    }
    unlink_if_creator();
}

}  // namespace shardline
