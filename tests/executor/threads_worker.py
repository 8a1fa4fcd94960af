"""The model worker, for tests of what its process sets up; in a module of its own so that
the stub workers' processes do not import the model code."""

from __future__ import annotations

import torch

from shardline.worker.worker import Worker


class TorchThreadsWorker(Worker):
    """The model worker, which also says how many torch threads its process runs."""

    def torch_threads(self) -> int:
        return torch.get_num_threads()
