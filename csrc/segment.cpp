#include "segment.hpp"

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <stdexcept>
#include <string>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include "errors.hpp"

namespace shardline {
namespace {

std::string random_name() {
    unsigned char bytes[16];
    size_t got = 0;
    while (got < sizeof(bytes)) {
        ssize_t n = getrandom(bytes + got, sizeof(bytes) - got, 0);
        if (n < 0) {
            if (errno == EINTR) continue;
            throw OsError(errno, std::string("getrandom failed: ") + std::strerror(errno));
        }
        got += static_cast<size_t>(n);
    }
    char hex[2 * sizeof(bytes) + 1];
    for (size_t i = 0; i < sizeof(bytes); ++i) std::snprintf(hex + 2 * i, 3, "%02x", bytes[i]);
    return std::string("/shardline-") + hex;
}

void* map_fd(int fd, size_t bytes, const std::string& name) {
    void* data = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (data == MAP_FAILED) {
        int err = errno;
        throw OsError(err, "mmap of shared-memory segment " + name + " (" + std::to_string(bytes) +
                               " bytes) failed: " + std::strerror(err));
    }
    return data;
}

constexpr char kShmDir[] = "/dev/shm";

// Sizes the file open as `fd` (mode exactly 0600: open applies the umask) and maps it. The
// memory is reserved now so that a full /dev/shm fails here with ENOSPC instead of raising
// SIGBUS at the first write into a missing page.
void* size_and_map(int fd, size_t bytes, const std::string& what) {
    int err = 0;
    if (fchmod(fd, 0600) != 0 || ftruncate(fd, static_cast<off_t>(bytes)) != 0) {
        err = errno;
    } else {
        err = posix_fallocate(fd, 0, static_cast<off_t>(bytes));
    }
    if (err != 0) {
        throw OsError(err, "sizing shared-memory segment " + what + " to " + std::to_string(bytes) +
                               " bytes failed: " + std::strerror(err));
    }
    return map_fd(fd, bytes, what);
}

// Gives the unnamed file open as `fd` a fresh "/shardline-<hex>" name in one step.
std::string link_under_random_name(int fd) {
    std::string self = "/proc/self/fd/" + std::to_string(fd);
    for (;;) {
        std::string name = random_name();
        std::string path = kShmDir + name;
        if (linkat(AT_FDCWD, self.c_str(), AT_FDCWD, path.c_str(), AT_SYMLINK_FOLLOW) == 0) return name;
        if (errno == EEXIST) continue;
        int err = errno;
        throw OsError(err, "naming shared-memory segment " + name + " failed: " + std::strerror(err));
    }
}

}  // namespace

Segment Segment::create(size_t bytes, const std::function<void(void*)>& init) {
    // The unnamed file is named through /proc (linkat with AT_EMPTY_PATH needs a capability).
    if (access("/proc/self/fd", X_OK) != 0) return create_named(bytes, init);
    int fd = ::open(kShmDir, O_TMPFILE | O_RDWR | O_CLOEXEC, 0600);
    if (fd < 0) {
        // A kernel or file system without unnamed files in /dev/shm.
        if (errno != EOPNOTSUPP && errno != EISDIR && errno != EINVAL && errno != ENOENT) {
            int err = errno;
            throw OsError(err, std::string("creating an unnamed file in ") + kShmDir + " failed: " +
                                   std::strerror(err));
        }
        return create_named(bytes, init);
    }
    void* data = nullptr;
    try {
        data = size_and_map(fd, bytes, "(unnamed, in /dev/shm)");
        init(data);
        std::string name = link_under_random_name(fd);
        close(fd);
        return Segment(std::move(name), data, bytes);
    } catch (...) {
        if (data != nullptr) munmap(data, bytes);
        close(fd);
        throw;
    }
}

Segment Segment::create_named(size_t bytes, const std::function<void(void*)>& init) {
    for (;;) {
        std::string name = random_name();
        int fd = shm_open(name.c_str(), O_CREAT | O_EXCL | O_RDWR, 0600);
        if (fd < 0) {
            if (errno == EEXIST) continue;
            int err = errno;
            throw OsError(err, "shm_open(" + name + ", O_CREAT|O_EXCL) failed: " + std::strerror(err));
        }
        void* data = nullptr;
        try {
            data = size_and_map(fd, bytes, name);
            init(data);
            close(fd);
            return Segment(std::move(name), data, bytes);
        } catch (...) {
            if (data != nullptr) munmap(data, bytes);
            close(fd);
            shm_unlink(name.c_str());
            throw;
        }
    }
}

Segment Segment::open(const std::string& name, size_t min_bytes) {
    if (name.empty() || name[0] != '/' || name.find('/', 1) != std::string::npos || name.size() > 255) {
        throw std::invalid_argument("name must look like '/shardline-<hex>' (one leading '/', no other '/', "
                                    "at most 255 characters), got '" + name + "'");
    }
    int fd = shm_open(name.c_str(), O_RDWR, 0);
    if (fd < 0) {
        int err = errno;
        throw OsError(err, "name: cannot open shared-memory segment '" + name + "': " + std::strerror(err) +
                               " (it must be a ring created by Ring.create and not yet fully attached)");
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int err = errno;
        close(fd);
        throw OsError(err, "fstat of shared-memory segment " + name + " failed: " + std::strerror(err));
    }
    size_t bytes = static_cast<size_t>(st.st_size);
    if (bytes < min_bytes) {
        close(fd);
        throw std::invalid_argument("name: segment '" + name + "' is " + std::to_string(bytes) +
                                    " bytes, smaller than a ring header (" + std::to_string(min_bytes) +
                                    " bytes); it is not a shardline ring");
    }
    try {
        void* data = map_fd(fd, bytes, name);
        close(fd);
        return Segment(name, data, bytes);
    } catch (...) {
        close(fd);
        throw;
    }
}

Segment::Segment(Segment&& other) noexcept
    : name_(std::move(other.name_)), data_(other.data_), size_(other.size_) {
    other.data_ = nullptr;
    other.size_ = 0;
}

Segment::~Segment() {
    if (data_ != nullptr) munmap(data_, size_);
}

void Segment::unlink(const std::string& name) {
    shm_unlink(name.c_str());
}

}  // namespace shardline
