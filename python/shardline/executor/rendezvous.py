"""FileRendezvous: where the ranks of one torch.distributed world meet on this machine, a
file store in a private directory that its last user removes (see executor.multiproc)."""

from __future__ import annotations

import shutil
import tempfile
import threading


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
        self.directory = tempfile.mkdtemp(prefix="shardline-rendezvous-")
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
