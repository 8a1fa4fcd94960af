// A named POSIX shared-memory segment: creation with an unguessable name, opening
// an existing one, mapping, and unlinking the name.
#pragma once

#include <cstddef>
#include <string>
#include <utility>

namespace shardline {

class Segment {
public:
    // Creates "/shardline-<32 hex digits>" with O_CREAT|O_EXCL and mode 0600, sized to bytes.
    static Segment create(size_t bytes);
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
    Segment(std::string name, void* data, size_t size) : name_(std::move(name)), data_(data), size_(size) {}
    std::string name_;
    void* data_;
    size_t size_;
};

}  // namespace shardline
