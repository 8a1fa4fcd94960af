#include "liveness.hpp"

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

namespace shardline {
namespace {

// What /proc/<pid>/stat says about a process that still exists.
struct ProcStat {
    char state;
    uint64_t start_time;
};

// False if the process is gone or its stat cannot be parsed.
bool read_proc_stat(pid_t pid, ProcStat* out) {
    char path[64];
    std::snprintf(path, sizeof(path), "/proc/%d/stat", static_cast<int>(pid));
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return false;
    char buf[1024];
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0) return false;
    buf[n] = '\0';
    // The format is "pid (comm) state f4 f5 ... f22=starttime ..."; comm may contain ')'.
    const char* field = std::strrchr(buf, ')');
    if (field == nullptr || field[1] != ' ' || field[2] == '\0') return false;
    out->state = field[2];
    field += 2;
    for (int index = 3; index < 22; ++index) {
        field = std::strchr(field, ' ');
        if (field == nullptr) return false;
        ++field;
    }
    out->start_time = std::strtoull(field, nullptr, 10);
    return true;
}

}  // namespace

uint64_t process_start_time(pid_t pid) {
    ProcStat stat;
    return read_proc_stat(pid, &stat) ? stat.start_time : 0;
}

bool process_alive(pid_t pid, uint64_t start_time) {
    if (pid <= 0 || pid == getpid()) return true;
    if (kill(pid, 0) != 0 && errno == ESRCH) return false;
    ProcStat stat;
    if (!read_proc_stat(pid, &stat)) return kill(pid, 0) == 0 || errno != ESRCH;
    if (stat.state == 'Z' || stat.state == 'X' || stat.state == 'x') return false;
    return start_time == 0 || stat.start_time == start_time;
}

uint64_t pid_namespace_id() {
    struct stat st;
    return stat("/proc/self/ns/pid", &st) == 0 ? static_cast<uint64_t>(st.st_ino) : 0;
}

}  // namespace shardline
