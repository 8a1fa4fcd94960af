"""The model worker, for tests of what its process sets up; in a module of its own so that
the stub workers' processes do not import the model code."""

from __future__ import annotations

import torch

from shardline.worker.worker import Worker


class TorchThreadsWorker(Worker):
    """The model worker, which also says how many torch threads its process runs."""

    def torch_threads(self) -> int:
        return torch.get_num_threads()


class CacheShapesWorker(Worker):
    """The model worker, which also lists the KV cache it allocated, per layer."""

    def kv_cache_shapes(self) -> dict[int, list[list[int]]]:
        model = self.model_runner.model
        layers = model.attention_layers()
        return {i: [list(a.k_cache.shape), list(a.v_cache.shape)]
                for i, a in zip(model.layer_range, layers)}
