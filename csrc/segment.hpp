// A named POSIX shared-memory segment: creation with an unguessable name, opening
// an existing one, mapping, and unlinking the name.
#pragma once

#include <cstddef>
#include <functional>
#include <string>
#include <utility>

namespace shardline {

class Segment {
public:
    // Creates "/shardline-<32 hex digits>" with mode 0600, sized to bytes, zero-filled, and
    // runs `init` on its memory before the name exists: a process killed at any point of a
    // create leaves no partly written segment under a name (no sweep could tell one from a
    // segment being written). Where /dev/shm takes no unnamed files, the name is made first.
    static Segment create(size_t bytes, const std::function<void(void*)>& init);
    // Opens and maps an existing segment; `min_bytes` guards against tiny foreign segments.
    static Segment open(const std::string& name, size_t min_bytes);

    Segment(Segment&& other) noexcept;
    Segment& operator=(Segment&&) = delete;
    Segment(const Segment&) = delete;
    ~Segment();

    // Removes the name from /dev/shm; the mapping stays valid. ENOENT is not an error.
    static void unlink(const std::string& name);

    void* data() const { return data_; }
    size_t size() const { return size_; }
    const std::string& name() const { return name_; }

private:
    static Segment create_named(size_t bytes, const std::function<void(void*)>& init);
    Segment(std::string name, void* data, size_t size) : name_(std::move(name)), data_(data), size_(size) {}
    std::string name_;
    void* data_;
    size_t size_;
};

}  // namespace shardline
