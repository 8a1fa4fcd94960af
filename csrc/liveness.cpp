#include "liveness.hpp"

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstring>

#include <fcntl.h>
#include <unistd.h>

namespace shardline {

bool process_alive(pid_t pid) {
    if (pid <= 0) return true;
    if (pid == getpid()) return true;
    if (kill(pid, 0) != 0 && errno == ESRCH) return false;

    char path[64];
    std::snprintf(path, sizeof(path), "/proc/%d/stat", static_cast<int>(pid));
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return errno != ENOENT;
    char buf[512];
    ssize_t n = read(fd, buf, sizeof(buf) - 1);
    close(fd);
    if (n <= 0) return true;
    buf[n] = '\0';
    // The format is "pid (comm) state ..."; comm may itself contain ')'.
    const char* paren = std::strrchr(buf, ')');
    if (paren == nullptr || paren[1] == '\0' || paren[2] == '\0') return true;
    char state = paren[2];
    return state != 'Z' && state != 'X' && state != 'x';
}

}  // namespace shardline
