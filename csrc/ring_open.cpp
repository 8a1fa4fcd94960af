// Creating and attaching rings: argument checks, segment setup, the unlink of the
// name once every reader is in, and the processes a writer expects to attach.
#include "ring.hpp"

#include <cstdio>
#include <limits>
#include <stdexcept>
#include <string>

#include <unistd.h>

#include "errors.hpp"
#include "futex.hpp"
#include "liveness.hpp"
#include "sweep.hpp"

namespace shardline {
namespace {

void check_range(const char* argument, int64_t value, uint64_t low, uint64_t high) {
    if (value < 0 || static_cast<uint64_t>(value) < low || static_cast<uint64_t>(value) > high) {
        throw std::invalid_argument(std::string(argument) + " must be in [" + std::to_string(low) + ", " +
                                    std::to_string(high) + "], got " + std::to_string(value));
    }
}

std::string hex(uint64_t value) {
    char buf[32];
    std::snprintf(buf, sizeof(buf), "0x%016llx", static_cast<unsigned long long>(value));
    return buf;
}

}  // namespace

Ring::Ring(Segment segment, int reader_index)
    : segment_(std::move(segment)),
      layout_(static_cast<SegmentLayout*>(segment_.data())),
      slots_(static_cast<char*>(segment_.data()) + sizeof(SegmentLayout)),
      name_(segment_.name()),
      n_readers_(layout_->header.n_readers),
      n_slots_(layout_->header.n_slots),
      slot_size_(layout_->header.slot_size),
      slot_stride_(layout_->header.slot_stride),
      reader_index_(reader_index),
      creator_pid_(reader_index < 0 ? getpid() : 0) {
    if (reader_index_ >= 0) read_seq_ = layout_->readers[reader_index_].seq.load(std::memory_order_acquire);
}

std::unique_ptr<Ring> Ring::create(int64_t n_readers, int64_t n_slots, int64_t slot_size) {
    check_range("n_readers", n_readers, 1, kMaxReaders);
    check_range("n_slots", n_slots, 1, kMaxSlots);
    check_range("slot_size", slot_size, 1, kMaxSlotSize);
    uint64_t bytes = segment_bytes_for(n_slots, slot_size);
    if (bytes > kMaxSegmentBytes) {
        throw std::invalid_argument("n_slots * slot_size must be at most " + std::to_string(kMaxSegmentBytes >> 30) +
                                    " GiB of shared memory, got n_slots=" + std::to_string(n_slots) +
                                    ", slot_size=" + std::to_string(slot_size));
    }
    try {
        sweep_orphans();
    } catch (const OsError&) {
        // Best effort: an unlistable /dev/shm is for shm_open below to report, not the sweep.
    }
    // The segment comes zero-filled, which is the initial state of every atomic.
    Segment segment = Segment::create(bytes, [&](void* data) {
        SegmentHeader& h = static_cast<SegmentLayout*>(data)->header;
        h.version = kVersion;
        h.n_readers = static_cast<uint32_t>(n_readers);
        h.n_slots = static_cast<uint64_t>(n_slots);
        h.slot_size = static_cast<uint64_t>(slot_size);
        h.slot_stride = slot_stride_for(slot_size);
        h.segment_bytes = bytes;
        h.writer_pid = getpid();
        h.writer_start_time = process_start_time(h.writer_pid);
        h.writer_pid_namespace = pid_namespace_id();
        // Release: an attacher that acquires the magic sees the whole header above.
        h.magic.store(kMagic, std::memory_order_release);
    });
    return std::unique_ptr<Ring>(new Ring(std::move(segment), -1));
}

std::unique_ptr<Ring> Ring::attach(const std::string& name, int64_t reader_index) {
    Segment segment = Segment::open(name, sizeof(SegmentLayout));
    auto* layout = static_cast<SegmentLayout*>(segment.data());
    SegmentHeader& h = layout->header;
    // Acquire pairs with the creator's release store of the magic.
    uint64_t magic = h.magic.load(std::memory_order_acquire);
    if (magic != kMagic) {
        throw std::invalid_argument("name: segment '" + name + "' has magic " + hex(magic) + ", expected " +
                                    hex(kMagic) + "; it is not a shardline ring");
    }
    if (h.version != kVersion) {
        throw std::invalid_argument("name: segment '" + name + "' has ring layout version " +
                                    std::to_string(h.version) + ", this build reads only version " +
                                    std::to_string(kVersion));
    }
    bool geometry_ok = h.n_readers >= 1 && h.n_readers <= kMaxReaders && h.n_slots >= 1 &&
                       h.n_slots <= kMaxSlots && h.slot_size >= 1 && h.slot_size <= kMaxSlotSize &&
                       h.slot_stride == slot_stride_for(h.slot_size) &&
                       h.segment_bytes == segment_bytes_for(h.n_slots, h.slot_size) &&
                       h.segment_bytes <= segment.size();
    if (!geometry_ok) {
        throw std::invalid_argument("name: segment '" + name + "' has an inconsistent ring geometry (n_readers=" +
                                    std::to_string(h.n_readers) + ", n_slots=" + std::to_string(h.n_slots) +
                                    ", slot_size=" + std::to_string(h.slot_size) + ", " +
                                    std::to_string(segment.size()) + " bytes)");
    }
    check_range("reader_index", reader_index, 0, h.n_readers - 1);
    ReaderLine& line = layout->readers[reader_index];
    uint32_t unattached = 0;
    if (!line.attached.compare_exchange_strong(unattached, 1, std::memory_order_acq_rel)) {
        throw std::invalid_argument("reader_index " + std::to_string(reader_index) + " of ring '" + name +
                                    "' is already attached; each reader_index in [0, " +
                                    std::to_string(h.n_readers - 1) + "] attaches once");
    }
    std::unique_ptr<Ring> ring(new Ring(std::move(segment), static_cast<int>(reader_index)));
    ring->record_identity();
    uint32_t attached = h.attached_readers.fetch_add(1, std::memory_order_acq_rel) + 1;
    if (attached == h.n_readers) {
        Segment::unlink(name);
        h.all_attached.store(1, std::memory_order_seq_cst);
    }
    layout->attach_wait.epoch.fetch_add(1, std::memory_order_seq_cst);
    futex_wake_all(&layout->attach_wait.epoch);
    return ring;
}

std::vector<Ring::Peer> Ring::expected_readers(const std::vector<int64_t>& reader_pids) const {
    if (reader_pids.size() > n_readers_) {
        throw std::invalid_argument("reader_pids lists " + std::to_string(reader_pids.size()) +
                                    " processes but ring '" + name_ + "' has only " + std::to_string(n_readers_) +
                                    " readers; list each process that attaches a reader once");
    }
    std::vector<Peer> peers;
    for (size_t i = 0; i < reader_pids.size(); ++i) {
        std::string argument = "reader_pids[" + std::to_string(i) + "]";
        check_range(argument.c_str(), reader_pids[i], 1, std::numeric_limits<pid_t>::max());
        for (size_t j = 0; j < i; ++j) {
            if (reader_pids[j] == reader_pids[i]) {
                throw std::invalid_argument("reader_pids lists pid " + std::to_string(reader_pids[i]) +
                                            " twice (at " + std::to_string(j) + " and " + std::to_string(i) +
                                            "); list each process once, however many readers it attaches");
            }
        }
        auto pid = static_cast<pid_t>(reader_pids[i]);
        peers.push_back(Peer{pid, process_start_time(pid)});
    }
    return peers;
}

Ring::~Ring() {
    if (owned_by_this_process()) close();
}

bool Ring::owned_by_this_process() const {
    pid_t self = getpid();
    if (is_writer()) return creator_pid_ == self;
    return layout_->readers[reader_index_].pid.load(std::memory_order_acquire) == self;
}

void Ring::unlink_if_creator() {
    if (creator_pid_ == getpid() && layout_->header.all_attached.load(std::memory_order_acquire) == 0) {
        Segment::unlink(name_);
    }
}

}  // namespace shardline
