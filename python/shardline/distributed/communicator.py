"""The collectives and point-to-point transfers of one process group, chosen by device.

A tensor on the group's device goes over the device group (NCCL on CUDA, gloo on
CPU); a CPU tensor of a CUDA group goes over the group's gloo CPU group. CPU all-reduce
and all-gather use the group's shared segment when it has one (ranks on one machine,
see shardline.distributed.shm). Small control data (`*_metadata`) is msgpack over the
CPU group, never pickle. Group ranks (0..size-1) name peers; the global ranks are in
`ranks`.

Every operation counts what this rank hands to the transport, per kind of operation
(see CommStats), so a benchmark can report bytes per token per rank.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import msgpack
import torch
import torch.distributed as dist

from shardline.distributed.shm import ShmGroup

# torch 2.13 renamed these and deprecated the old names; 2.11 has only the old ones.
_all_gather_into = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_into = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class CommStats:
    """Bytes sent and calls, per kind of operation, since the last reset.

    Bytes are the payload this rank contributes: the whole input of an all-reduce or a
    reduce-scatter, this rank's part of an all-gather, the rows bound for other ranks of
    an all-to-all, a sent tensor, a broadcast tensor on its source only, and the encoded
    bytes of metadata. Size-1 groups count nothing. `shm_calls` counts the calls the
    shared segment served.
    """

    def __init__(self) -> None:
        self.bytes_sent: defaultdict[str, int] = defaultdict(int)
        self.calls: defaultdict[str, int] = defaultdict(int)
        self.shm_calls: defaultdict[str, int] = defaultdict(int)

    def record(self, kind: str, nbytes: int) -> None:
        self.bytes_sent[kind] += nbytes
        self.calls[kind] += 1

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {"bytes_sent": dict(self.bytes_sent), "calls": dict(self.calls),
                "shm_calls": dict(self.shm_calls)}

    def reset(self) -> None:
        for counter in (self.bytes_sent, self.calls, self.shm_calls):
            counter.clear()


def _nbytes(x: torch.Tensor) -> int:
    return x.numel() * x.element_size()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class Communicator:
    """One rank's side of one group. `rank` is this process's global rank, which must be
    in `ranks` (the group's global ranks, ascending)."""

    def __init__(self, ranks: Sequence[int], rank: int, device: torch.device | str,
                 device_group: dist.ProcessGroup | None = None,
                 cpu_group: dist.ProcessGroup | None = None, shm: ShmGroup | None = None):
        self.ranks = tuple(ranks)
        if rank not in self.ranks:
            raise ValueError(f"rank={rank} is not in the group's ranks {list(self.ranks)}")
        self.rank = rank
        self.rank_in_group = self.ranks.index(rank)
        self.size = len(self.ranks)
        self.device = torch.device(device)
        if self.size > 1 and (device_group is None or cpu_group is None):
            raise ValueError(f"a group of {self.size} ranks needs a device_group and a cpu_group")
        self.device_group = device_group
        self.cpu_group = cpu_group
        self.shm = shm
        self.stats = CommStats()

    def __repr__(self) -> str:
        path = f", shm={self.shm.name}" if self.shm is not None else ""
        return (f"Communicator(ranks={list(self.ranks)}, rank_in_group={self.rank_in_group}, "
                f"device={self.device}{path})")

    def _group(self, x: torch.Tensor) -> dist.ProcessGroup:
        if x.device.type == self.device.type:
            return self.device_group
        if x.device.type == "cpu":
            return self.cpu_group
        raise ValueError(f"tensor on {x.device} cannot travel in a group on {self.device}: "
                         f"use a tensor on {self.device.type} or on cpu")

    def _peer(self, peer: int, argument: str) -> int:
        if isinstance(peer, bool) or not isinstance(peer, int) or not 0 <= peer < self.size:
            raise ValueError(f"{argument}={peer!r} is invalid: must be a group rank in "
                             f"[0, {self.size})")
        if peer == self.rank_in_group:
            raise ValueError(f"{argument}={peer} is this rank itself; point-to-point needs "
                             "another rank of the group")
        return self.ranks[peer]

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sums x over the group in place and returns it."""
        if self.size == 1:
            return x
        self.stats.record("all_reduce", _nbytes(x))
        if self.shm is not None and self.shm.can_all_reduce(x):
            self.stats.shm_calls["all_reduce"] += 1
            return self.shm.all_reduce(x)
        target = x if x.is_contiguous() else x.contiguous()
        dist.all_reduce(target, group=self._group(x))
        if target is not x:
            x.copy_(target)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """Every rank's x concatenated along `dim`, in group-rank order (a 0-d x gives a
        1-d result). `out`, a contiguous tensor of the result's shape, dtype and device,
        receives it instead of a new tensor: a caller gathering large results every step
        saves allocating (and page-faulting) one per call."""
        if x.dim() == 0:
            x, dim = x.reshape(1), 0
        dim %= x.dim()
        shape = list(x.shape)
        shape[dim] *= self.size
        if out is not None and (list(out.shape) != shape or out.dtype != x.dtype
                                or out.device != x.device or not out.is_contiguous()):
            raise ValueError(f"all_gather: out must be a contiguous {x.dtype} tensor of shape "
                             f"{shape} on {x.device}, got {out.dtype} {list(out.shape)} on "
                             f"{out.device}")
        if self.size == 1:
            return x if out is None else out.copy_(x)
        self.stats.record("all_gather", _nbytes(x))
        if out is None:
            out = torch.empty(shape, dtype=x.dtype, device=x.device)
        if self.shm is not None and x.device.type == "cpu":
            self.stats.shm_calls["all_gather"] += 1
            return self.shm.all_gather(x, dim, out)
        # Flat buffers: backends disagree on the shapes they accept here.
        flat = out.view(-1) if dim == 0 else torch.empty(out.numel(), dtype=x.dtype,
                                                         device=x.device)
        _all_gather_into(flat, x.contiguous().view(-1), group=self._group(x))
        if dim != 0:
            torch.cat(flat.view(self.size, *x.shape).unbind(0), dim=dim, out=out)
        return out

    def gather(self, x: torch.Tensor, dst: int = 0, dim: int = -1) -> torch.Tensor | None:
        """Every rank's x concatenated along `dim` on group rank `dst` only; None elsewhere.
        (Between CPU ranks of one machine the shared-memory all-gather is faster than
        gloo's gather, so it serves here, and the other ranks drop the result.)"""
        if isinstance(dst, bool) or not isinstance(dst, int) or not 0 <= dst < self.size:
            raise ValueError(f"dst={dst!r} is invalid: must be a group rank in [0, {self.size})")
        if self.size == 1:
            return x
        if self.shm is not None and x.device.type == "cpu":
            out = self.all_gather(x, dim)
            return out if self.rank_in_group == dst else None
        self.stats.record("gather", _nbytes(x))
        x = x.contiguous()
        parts = ([torch.empty_like(x) for _ in range(self.size)]
                 if self.rank_in_group == dst else None)
        dist.gather(x, parts, dst=self.ranks[dst], group=self._group(x))
        return None if parts is None else torch.cat(parts, dim=dim)

    def reduce_scatter(self, x: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """This rank's part of the sum of x over the group: x is cut into `size` equal
        parts along `dim` and rank i gets the sum of every rank's part i. x is unchanged."""
        if self.size == 1:
            return x
        if x.dim() == 0 or x.shape[dim] % self.size:
            raise ValueError(f"reduce_scatter: x of shape {tuple(x.shape)} cannot be cut into "
                             f"{self.size} equal parts along dim={dim}")
        dim %= x.dim()
        part = x.shape[dim] // self.size
        self.stats.record("reduce_scatter", _nbytes(x))
        if self.shm is not None and self.shm.can_all_reduce(x):
            self.stats.shm_calls["reduce_scatter"] += 1
            total = self.shm.all_reduce(x.clone(memory_format=torch.contiguous_format))
            return total.narrow(dim, self.rank_in_group * part, part).contiguous()
        moved = x.movedim(dim, 0).contiguous()
        out = torch.empty(moved.numel() // self.size, dtype=x.dtype, device=x.device)
        _reduce_scatter_into(out, moved.view(-1), group=self._group(x))
        return out.view(part, *moved.shape[1:]).movedim(0, dim).contiguous()

    def exchange_splits(self, input_splits: Sequence[int]) -> list[int]:
        """How many rows each rank will send this rank in an all-to-all in which this rank
        sends input_splits[i] rows to rank i (a collective over the CPU group)."""
        if self.size == 1:
            return list(input_splits)
        counts = torch.tensor(list(input_splits), dtype=torch.int64)
        received = torch.empty_like(counts)
        dist.all_to_all_single(received, counts, group=self.cpu_group)
        return received.tolist()

    def all_to_all(self, x: torch.Tensor, input_splits: Sequence[int] | None = None,
                   output_splits: Sequence[int] | None = None) -> torch.Tensor:
        """Sends rows input_splits[i] of x (along dim 0, consecutive) to rank i and returns
        the rows received, in rank order. Without input_splits x is cut into equal parts;
        without output_splits they are exchanged first (see exchange_splits)."""
        rows = x.shape[0] if x.dim() else 0
        if input_splits is None:
            if rows % self.size:
                raise ValueError(f"all_to_all: {rows} rows cannot be cut into {self.size} equal "
                                 "parts; pass input_splits")
            input_splits = [rows // self.size] * self.size
        input_splits = list(input_splits)
        if (len(input_splits) != self.size or sum(input_splits) != rows
                or any(not isinstance(n, int) or n < 0 for n in input_splits)):
            raise ValueError(f"input_splits={input_splits} is invalid: must be {self.size} "
                             f"non-negative ints adding up to the {rows} rows of x")
        if output_splits is None:
            output_splits = self.exchange_splits(input_splits)
        output_splits = list(output_splits)
        if len(output_splits) != self.size or any(n < 0 for n in output_splits):
            raise ValueError(f"output_splits={output_splits} is invalid: must be {self.size} "
                             "non-negative ints")
        if self.size == 1:
            return x
        row_bytes = _nbytes(x) // rows if rows else 0
        self.stats.record("all_to_all", (rows - input_splits[self.rank_in_group]) * row_bytes)
        out = torch.empty((sum(output_splits), *x.shape[1:]), dtype=x.dtype, device=x.device)
        dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits,
                               group=self._group(x))
        return out

    def broadcast(self, x: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Overwrites x on every rank with group rank `src`'s x (in place) and returns it."""
        if self.size == 1:
            return x
        if self.rank_in_group == src:
            self.stats.record("broadcast", _nbytes(x))
        else:
            self._peer(src, "src")
        target = x if x.is_contiguous() else x.contiguous()
        dist.broadcast(target, src=self.ranks[src], group=self._group(x))
        if target is not x:
            x.copy_(target)
        return x

    def send(self, x: torch.Tensor, dst: int) -> None:
        """Sends x to group rank `dst`, which receives it with recv() of the same shape and dtype."""
        peer = self._peer(dst, "dst")
        self.stats.record("send", _nbytes(x))
        dist.send(x.contiguous(), dst=peer, group=self._group(x))

    def recv(self, shape: Sequence[int], dtype: torch.dtype, src: int,
             device: torch.device | str | None = None) -> torch.Tensor:
        """Receives a tensor of known shape and dtype from group rank `src` (on this
        group's device unless `device` says otherwise)."""
        peer = self._peer(src, "src")
        out = torch.empty(tuple(shape), dtype=dtype, device=device or self.device)
        dist.recv(out, src=peer, group=self._group(out))
        return out

    def send_metadata(self, obj: object, dst: int) -> None:
        """Sends a small msgpack-able object (dicts, lists, str, numbers) to group rank `dst`."""
        peer = self._peer(dst, "dst")
        payload = msgpack.packb(obj)
        self.stats.record("metadata", len(payload))
        dist.send(torch.tensor([len(payload)], dtype=torch.int64), dst=peer, group=self.cpu_group)
        dist.send(torch.frombuffer(bytearray(payload), dtype=torch.uint8), dst=peer,
                  group=self.cpu_group)

    def recv_metadata(self, src: int) -> object:
        """Receives what send_metadata sent (tuples arrive as lists)."""
        peer = self._peer(src, "src")
        length = torch.empty(1, dtype=torch.int64)
        dist.recv(length, src=peer, group=self.cpu_group)
        payload = torch.empty(int(length), dtype=torch.uint8)
        dist.recv(payload, src=peer, group=self.cpu_group)
        return msgpack.unpackb(payload.numpy().tobytes())

    def broadcast_metadata(self, obj: object, src: int = 0) -> object:
        """Group rank `src`'s obj on every rank (others pass anything, e.g. None)."""
        if self.size == 1:
            return obj
        is_src = self.rank_in_group == src
        payload = msgpack.packb(obj) if is_src else b""
        if is_src:
            self.stats.record("metadata", len(payload))
        length = torch.tensor([len(payload)], dtype=torch.int64)
        dist.broadcast(length, src=self.ranks[src], group=self.cpu_group)
        data = (torch.frombuffer(bytearray(payload), dtype=torch.uint8) if is_src
                else torch.empty(int(length), dtype=torch.uint8))
        dist.broadcast(data, src=self.ranks[src], group=self.cpu_group)
        return obj if is_src else msgpack.unpackb(data.numpy().tobytes())

    def send_tensor_dict(self, tensors: dict[str, torch.Tensor], dst: int) -> None:
        """Sends named tensors of any shapes and dtypes: their description as metadata,
        then each tensor, so the receiver needs to know nothing in advance."""
        self.send_metadata([[name, list(t.shape), _dtype_name(t.dtype), t.device.type]
                            for name, t in tensors.items()], dst)
        for t in tensors.values():
            self.send(t, dst)

    def recv_tensor_dict(self, src: int) -> dict[str, torch.Tensor]:
        """Receives what send_tensor_dict sent, each tensor on the device type it left."""
        out = {}
        for name, shape, dtype, device_type in self.recv_metadata(src):
            device = self.device if device_type == self.device.type else torch.device("cpu")
            out[name] = self.recv(shape, getattr(torch, dtype), src, device=device)
        return out

    def barrier(self) -> None:
        """Returns once every rank of the group got here (over the CPU group)."""
        if self.size > 1:
            dist.barrier(group=self.cpu_group)

    def close(self) -> None:
        """Releases the shared segment; the process groups are torch.distributed's to destroy."""
        if self.shm is not None:
            self.shm.close()
            self.shm = None
