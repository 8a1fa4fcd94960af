// Whether a process id still names the same running (not exited, not zombie) process.
#pragma once

#include <cstdint>

#include <sys/types.h>

namespace shardline {

// The kernel's start time of `pid` (clock ticks since boot), or 0 if unknown.
// Together with the pid it names one process even after the pid is reused.
uint64_t process_start_time(pid_t pid);

// False once the process has exited, even while it is an unreaped zombie (a parent
// blocked in a ring wait cannot reap its dead child, so kill(pid, 0) alone would
// report the peer alive forever), and false once its pid names a newer process.
// A start_time of 0 skips the reuse check.
bool process_alive(pid_t pid, uint64_t start_time);

// The pid namespace of this process (the inode of /proc/self/ns/pid), or 0 if unknown.
// A pid recorded in another namespace says nothing about the processes visible here.
uint64_t pid_namespace_id();

}  // namespace shardline
