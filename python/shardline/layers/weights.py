"""Reading one rank's part of a checkpoint tensor without materializing the rest.

A checkpoint tensor arrives either as a lazily read slice of a safetensors file
(`shardline.models.safetensors_slices.TensorSlice`, or safetensors' own `get_slice`) or
as a plain tensor; both are checked against the shape the layer expects
before anything is copied, so a wrong checkpoint fails with the tensor's name.
"""

from __future__ import annotations

from typing import Any

import torch

Loaded = Any  # torch.Tensor, or a TensorSlice / safetensors slice


def loaded_shape(loaded: Loaded) -> tuple[int, ...]:
    if isinstance(loaded, torch.Tensor):
        return tuple(loaded.shape)
    return tuple(loaded.get_shape())


def check_shape(name: str, loaded: Loaded, expected: tuple[int, ...]) -> None:
    """Raise ValueError naming the tensor when its on-disk shape is not the expected one."""
    found = loaded_shape(loaded)
    if found != tuple(expected):
        raise ValueError(f"checkpoint tensor {name!r} has shape {list(found)}, "
                         f"expected {list(expected)}")


def read_slice(loaded: Loaded, dim: int = 0, start: int = 0, length: int | None = None
               ) -> torch.Tensor:
    """Read loaded[..., start:start + length, ...] along `dim` (all of it when length is None)."""
    ndim = len(loaded_shape(loaded))
    if length is None:
        index = (slice(None),) * ndim
    else:
        index = tuple(slice(start, start + length) if d == dim else slice(None)
                      for d in range(ndim))
    if isinstance(loaded, torch.Tensor):
        return loaded[index]
    return loaded[index] if ndim else loaded[...]


def copy_into(param: torch.Tensor, value: torch.Tensor) -> None:
    with torch.no_grad():
        param.copy_(value.to(param.dtype))
