"""A stub worker that joins a torch.distributed world at the executor's rendezvous, for
tests of the rendezvous itself; in a module of its own so that the other stub workers'
processes do not import torch."""

from __future__ import annotations

import torch
import torch.distributed as dist

from stub_workers import StubWorker


class RendezvousWorker(StubWorker):
    """Joins a gloo world of every rank at `distributed_init_method` in `init_device`."""

    def __init__(self, config, rank: int = 0, distributed_init_method: str | None = None):
        super().__init__(config, rank)
        self.init_method = distributed_init_method

    def init_device(self) -> None:
        dist.init_process_group("gloo", init_method=self.init_method, rank=self.rank,
                                world_size=self.config.parallel.world_size)

    def rendezvous(self) -> str:
        return self.init_method

    def all_reduce(self, values: list[float]) -> float:
        """The sum over the ranks of each one's entry of `values`."""
        tensor = torch.tensor([values[self.rank]], dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.item()

    def shutdown(self) -> None:
        dist.destroy_process_group()


class FailingRendezvousWorker(RendezvousWorker):
    """Rank 1 fails `init_device` once every rank has joined (a failed start)."""

    def init_device(self) -> None:
        super().init_device()
        if self.rank == 1:
            raise RuntimeError("init_device failed on purpose")
