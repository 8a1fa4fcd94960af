// Whether a process id still names a running (not exited, not zombie) process.
#pragma once

#include <sys/types.h>

namespace shardline {

// False once the process has exited, even while it is an unreaped zombie: a
// parent blocked in a ring wait cannot reap its dead child, so kill(pid, 0)
// alone would report the peer alive forever.
bool process_alive(pid_t pid);

}  // namespace shardline
