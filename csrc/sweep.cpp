#include "sweep.hpp"

#include <cerrno>
#include <cstring>
#include <memory>

#include <dirent.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "errors.hpp"
#include "layout.hpp"
#include "liveness.hpp"

namespace shardline {
namespace {

constexpr char kShmDir[] = "/dev/shm";
constexpr char kPrefix[] = "shardline-";

// Whether the file open as `fd` is a ring of this build whose writer is known dead.
bool is_orphan(int fd, uint64_t own_pid_namespace) {
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || st.st_uid != geteuid() ||
        static_cast<uint64_t>(st.st_size) < sizeof(SegmentLayout)) {
        return false;
    }
    // A ring segment never shrinks once sized, so the header page stays backed.
    void* data = mmap(nullptr, sizeof(SegmentHeader), PROT_READ, MAP_SHARED, fd, 0);
    if (data == MAP_FAILED) return false;
    const auto* header = static_cast<const SegmentHeader*>(data);
    // Acquire pairs with the creator's release store of the magic: the fields read
    // after it are complete.
    bool orphan = header->magic.load(std::memory_order_acquire) == kMagic && header->version == kVersion &&
                  own_pid_namespace != 0 && header->writer_pid_namespace == own_pid_namespace &&
                  !process_alive(header->writer_pid, header->writer_start_time);
    munmap(data, sizeof(SegmentHeader));
    return orphan;
}

}  // namespace

std::vector<std::string> sweep_orphans() {
    std::unique_ptr<DIR, int (*)(DIR*)> dir(opendir(kShmDir), &closedir);
    if (!dir) {
        int err = errno;
        throw OsError(err, std::string("sweep_orphans: cannot list ") + kShmDir + ": " + std::strerror(err));
    }
    uint64_t own_pid_namespace = pid_namespace_id();
    std::vector<std::string> removed;
    while (dirent* entry = readdir(dir.get())) {
        if (std::strncmp(entry->d_name, kPrefix, sizeof(kPrefix) - 1) != 0) continue;
        if (entry->d_type != DT_REG && entry->d_type != DT_UNKNOWN) continue;
        // O_NONBLOCK: a FIFO under a matching name must not block the open.
        int fd = openat(dirfd(dir.get()), entry->d_name, O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC);
        if (fd < 0) continue;
        bool orphan = is_orphan(fd, own_pid_namespace);
        close(fd);
        std::string name = std::string("/") + entry->d_name;
        // ENOENT means someone else removed it meanwhile, which is just as good.
        if (orphan && shm_unlink(name.c_str()) == 0) removed.push_back(std::move(name));
    }
    return removed;
}

}  // namespace shardline
