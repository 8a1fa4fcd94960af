// The shared-memory layout of a ring segment, identical in every attached process.
//
//   SegmentHeader | write cursor | 3 wait lines | 64 reader lines | n_slots x slot
//
// Every block that one side writes on the hot path sits on its own 64-byte cache
// line so the writer and the readers never false-share.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>

namespace shardline {

inline constexpr uint64_t kMagic = 0x676e69526c64726bULL;  // "krdlRing" little-endian
inline constexpr uint32_t kVersion = 3;
inline constexpr uint32_t kMaxReaders = 64;
inline constexpr uint64_t kMaxSlots = 1u << 20;
inline constexpr uint64_t kMaxSlotSize = 64ull << 20;
inline constexpr uint64_t kMaxSegmentBytes = 16ull << 30;
// The largest message a ring carries. A reader allocates a message's bytes as soon as
// its first slot names the size, so a size read from (possibly corrupt) shared memory
// must be bounded before it is believed; writers refuse larger messages.
inline constexpr uint64_t kMaxMessageBytes = 4ull << 30;
inline constexpr size_t kCacheLine = 64;

// Geometry and lifecycle state, written once at creation except for the atomics.
struct alignas(kCacheLine) SegmentHeader {
    std::atomic<uint64_t> magic;  // stored last, with release, once the rest is valid
    uint32_t version;
    uint32_t n_readers;
    uint64_t n_slots;
    uint64_t slot_size;
    uint64_t slot_stride;
    uint64_t segment_bytes;
    int32_t writer_pid;
    uint64_t writer_start_time;  // see process_start_time()
    uint64_t writer_pid_namespace;  // see pid_namespace_id(); the namespace writer_pid belongs to
    std::atomic<uint32_t> closed;
    std::atomic<uint32_t> attached_readers;
    std::atomic<uint32_t> all_attached;  // set by the last attacher after it unlinked the name
};

// The next sequence number the writer will publish; slots below it are readable.
struct alignas(kCacheLine) WriteCursor {
    std::atomic<uint64_t> seq;
};

// A futex word plus a word that is nonzero while a process may sleep on it, so that
// wakers can skip the wake system call when nobody sleeps. The ring uses `sleepers` as
// a flag that waiters set and wakers clear (see Ring::notify()).
struct alignas(kCacheLine) WaitLine {
    std::atomic<uint32_t> epoch;
    std::atomic<uint32_t> sleepers;
};

// One reader's cursor (the next sequence number it will consume) and identity.
struct alignas(kCacheLine) ReaderLine {
    std::atomic<uint64_t> seq;
    std::atomic<int32_t> pid;  // 0 while the identity is being (re)written
    std::atomic<uint32_t> attached;
    std::atomic<uint64_t> start_time;
};

struct SegmentLayout {
    SegmentHeader header;
    WriteCursor write;
    WaitLine data_wait;    // readers sleep here for new slots
    WaitLine space_wait;   // the writer sleeps here for free slots
    WaitLine attach_wait;  // the writer sleeps here in wait_attached()
    ReaderLine readers[kMaxReaders];
};

// SlotHeader::flags bits.
inline constexpr uint32_t kFirst = 1;  // first slot of a message; message_bytes is valid
inline constexpr uint32_t kLast = 2;   // last slot of a message
inline constexpr uint32_t kAbort = 4;  // the writer gave up on the message in progress; drop it

// Precedes the payload of every slot.
struct SlotHeader {
    uint64_t seq;            // the sequence number this slot was written for
    uint64_t message_bytes;  // total size of the message this slot belongs to
    uint32_t bytes;          // payload bytes in this slot
    uint32_t flags;          // kFirst | kLast | kAbort
    uint64_t reserved;
};

inline constexpr uint64_t align_up(uint64_t value, uint64_t alignment) {
    return (value + alignment - 1) / alignment * alignment;
}

inline constexpr uint64_t slot_stride_for(uint64_t slot_size) {
    return align_up(sizeof(SlotHeader) + slot_size, kCacheLine);
}

inline constexpr uint64_t segment_bytes_for(uint64_t n_slots, uint64_t slot_size) {
    return sizeof(SegmentLayout) + n_slots * slot_stride_for(slot_size);
}

static_assert(sizeof(SegmentLayout) % kCacheLine == 0);
static_assert(sizeof(SlotHeader) == 32);
static_assert(std::atomic<uint64_t>::is_always_lock_free, "shared-memory atomics must be lock-free");
static_assert(std::atomic<uint32_t>::is_always_lock_free, "shared-memory atomics must be lock-free");

}  // namespace shardline
