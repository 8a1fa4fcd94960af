"""FileRendezvous: where the ranks of one torch.distributed world meet on this machine, a
file store in a private directory that its last user removes (see executor.multiproc).

When the engine and all its workers are killed at once (`kill -9` of the whole process
group), nobody is left to remove the directory. Each directory therefore names the process
that made it, and making a new one removes those of this user whose maker is gone: a
crash leaves nothing in the temporary directory past the next engine's start. Where /proc
is missing or shows another pid namespace, nothing is recorded or swept.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
import threading

from shardline.executor.proc_stat import start_time, still_running

PREFIX = "shardline-rendezvous-"
OWNER_FILE = "owner"
def _proc_is_this_namespaces() -> bool:
    """Whether /proc is mounted and numbers processes as this pid namespace does. A sandbox
    may have none, or the host's (`unshare --pid` without --mount-proc): there /proc/<pid>
    is another process than this namespace's pid, and makers could be neither recorded
    nor checked."""
    try:
        return os.readlink("/proc/self") == str(os.getpid())
    except OSError:
        return False


def _pid_namespace() -> str:
    return str(os.stat("/proc/self/ns/pid").st_ino)


def _owner_record() -> str | None:
    """This process as a directory's maker; None where /proc cannot tell (see
    _proc_is_this_namespaces): the directory then names no maker and is kept."""
    if not _proc_is_this_namespaces():
        return None
    pid = os.getpid()
    return f"{_pid_namespace()} {pid} {start_time(pid)}\n"


def _abandoned(directory: str) -> bool:
    """Whether `directory`'s maker, a process of this pid namespace, has ended (a zombie
    has: killed, its parent has not waited for it yet). A directory without a readable
    record (another user's, one being made) is never abandoned."""
    try:
        with open(os.path.join(directory, OWNER_FILE)) as record:
            namespace, pid, started = record.read().split()
        pid = int(pid)
    except (OSError, ValueError):
        return False
    if namespace != _pid_namespace():
        return False
    return not still_running(pid, started)


def sweep_abandoned() -> list[str]:
    """Remove this user's rendezvous directories whose maker has ended; returns them."""
    if not _proc_is_this_namespaces():
        return []
    root = tempfile.gettempdir()
    try:
        names = [name for name in os.listdir(root) if name.startswith(PREFIX)]
    except OSError:
        return []
    removed = []
    for name in names:
        directory = os.path.join(root, name)
        try:
            info = os.lstat(directory)
        except OSError:
            continue
        if (stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid()
                and _abandoned(directory)):
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory)
    return removed


class FileRendezvous:
    """A torch.distributed URL of a file store that does not exist yet, in a directory only
    this user can enter, which the last of its users removes (or, if this process is
    killed, the workers that were given it: worker_proc.EngineWatch).

    Executors that share one (the data-parallel cores of one world) find it by its `url`,
    given to each as `distributed_init_method`: each takes a use of it (`join`) and gives
    it back at shutdown. Its maker holds the first use until the executors have started
    (as a context manager: to the end of the block), so that a core failing to start
    cannot remove it under the others.
    """

    _lock = threading.Lock()
    _open: dict[str, "FileRendezvous"] = {}

    def __init__(self) -> None:
        sweep_abandoned()
        self.directory = tempfile.mkdtemp(prefix=PREFIX)
        owner = _owner_record()
        if owner is not None:
            with open(os.path.join(self.directory, OWNER_FILE), "w") as record:
                record.write(owner)
        self.url = f"file://{self.directory}/store"
        self.users = 1
        with self._lock:
            self._open[self.url] = self

    @classmethod
    def join(cls, url: str | None) -> "FileRendezvous | None":
        """One more use of the rendezvous at `url`; a new one when `url` is None; None
        when `url` was made elsewhere (the caller's own, used as is and left alone)."""
        if url is None:
            return cls()
        with cls._lock:
            rendezvous = cls._open.get(url)
            if rendezvous is not None:
                rendezvous.users += 1
            return rendezvous

    def release(self) -> None:
        """Give back one use; the last removes the directory."""
        with self._lock:
            self.users -= 1
            if self.users > 0:
                return
            del self._open[self.url]
        shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> str:
        return self.url

    def __exit__(self, *exc_info: object) -> None:
        self.release()
