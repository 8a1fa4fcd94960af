// Removing the segments that writers killed before all their readers attached left
// in /dev/shm: the name is normally unlinked by the last attacher or by the creator's
// close() or destructor, and a SIGKILL skips both.
#pragma once

#include <string>
#include <vector>

namespace shardline {

// Unlinks every /dev/shm/shardline-* segment that is a complete ring of this layout
// version, owned by this user, and whose writer, a process of this pid namespace, is
// dead. Leaves alone anything else: a segment still being created, a live writer's,
// another user's, one that cannot be opened, a foreign file. Maps only each header.
// Returns the removed names ("/shardline-..."). Throws OsError if /dev/shm cannot be listed.
std::vector<std::string> sweep_orphans();

}  // namespace shardline
