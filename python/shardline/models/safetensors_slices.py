"""Reading parts of the tensors of a safetensors file with positioned reads, no memory map.

safetensors' own `get_slice` reads through a memory map of the file. The pages it touches
stay mapped, and so count in the process's resident memory, until the file is closed;
a slice along a later dimension (the input columns of a row-parallel weight) touches every
page of the tensor. A rank loading its quarter of a model that way peaked at 3.3 times its
share (bench/load_memory.py). Here the header is parsed once, and a slice is read as the
runs of contiguous bytes it covers, straight into the result tensor with preadv(2): the
bytes between two runs of one call land in a small scratch buffer, so memory grows by the
slice alone.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct

import numpy as np
import torch

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
          "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
GAP_BYTES = 64 << 10          # runs further apart than this are read by separate calls
MAX_CALL_BYTES = 256 << 20    # bytes per preadv call (Linux caps one read below 2 GiB)
_IOV_MAX = min(os.sysconf("SC_IOV_MAX"), 1024)


class SafetensorsFile:
    """One safetensors file: its header, read at open, and a descriptor for slice reads."""

    def __init__(self, path: str):
        self.path = path
        if not stat.S_ISREG(os.stat(path).st_mode):   # a FIFO would block the open forever
            kind = "a directory" if os.path.isdir(path) else "not a regular file"
            raise ValueError(f"{path} is {kind}, not a safetensors file")
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            self._entries = self._read_header()
        except BaseException:
            os.close(self._fd)
            raise

    def _read_header(self) -> dict[str, tuple[torch.dtype, tuple[int, ...], int]]:
        size = os.fstat(self._fd).st_size
        prefix = os.pread(self._fd, 8, 0)
        header_len = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else size
        if 8 + header_len > size:
            raise ValueError(f"{self.path}: not a safetensors file (header of {header_len} "
                             f"bytes in a file of {size})")
        try:
            header = json.loads(os.pread(self._fd, header_len, 8))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{self.path}: not a safetensors file (its header is not JSON: "
                             f"{exc})") from None
        if not isinstance(header, dict):
            raise ValueError(f"{self.path}: not a safetensors file (its header is a JSON "
                             f"{type(header).__name__}, not an object)")
        data_start = 8 + header_len
        entries = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            if not _well_formed(info):
                raise ValueError(f"{self.path}: tensor {name!r} has no valid dtype, shape and "
                                 f"data_offsets in the header: {info!r:.200}")
            if info["dtype"] not in DTYPES:
                raise ValueError(f"{self.path}: tensor {name!r} has dtype {info['dtype']}, "
                                 f"not one of {', '.join(DTYPES)}")
            dtype, shape = DTYPES[info["dtype"]], tuple(info["shape"])
            begin, end = info["data_offsets"]
            nbytes = math.prod(shape) * dtype.itemsize
            if end - begin != nbytes or data_start + end > size:
                raise ValueError(f"{self.path}: tensor {name!r} of shape {list(shape)} "
                                 f"{info['dtype']} has data_offsets {[begin, end]}, which do "
                                 f"not hold its {nbytes} bytes inside the file")
            entries[name] = (dtype, shape, data_start + begin)
        return entries

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def get_slice(self, name: str) -> "TensorSlice":
        if name not in self._entries:
            raise KeyError(f"{self.path} has no tensor {name!r}")
        return TensorSlice(self, name, *self._entries[name])

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def read_runs(self, starts: np.ndarray, run: int, out: memoryview) -> None:
        """Fill `out` with the `run` bytes at each file offset of `starts` (ascending), in
        order, in as few preadv calls as GAP_BYTES, MAX_CALL_BYTES and IOV_MAX allow."""
        if run > MAX_CALL_BYTES:
            for i, offset in enumerate(starts.tolist()):
                for done in range(0, run, MAX_CALL_BYTES):
                    length = min(MAX_CALL_BYTES, run - done)
                    dest = i * run + done
                    self._preadv([out[dest:dest + length]], offset + done, length)
            return
        gaps = (np.diff(starts) - run).tolist() + [0]   # bytes after each run
        # A call ends at a gap longer than GAP_BYTES, and before it would hold more than
        # IOV_MAX buffers or span more than MAX_CALL_BYTES.
        long_gaps = np.flatnonzero(np.array(gaps) > GAP_BYTES) + 1
        scratch = memoryview(bytearray(min(GAP_BYTES, max(gaps))))
        filler: dict[int, memoryview] = {}
        first, count = 0, len(gaps)
        while first < count:
            next_gap = long_gaps[np.searchsorted(long_gaps, first, side="right"):][:1].tolist()
            span_end = np.searchsorted(starts, starts[first] + MAX_CALL_BYTES - run, "right")
            last = min(count, first + _IOV_MAX // 2, int(span_end), *next_gap)
            buffers = []
            for k in range(first, last):
                buffers.append(out[k * run:(k + 1) * run])
                gap = gaps[k] if k + 1 < last else 0
                if gap:
                    if gap not in filler:
                        filler[gap] = scratch[:gap]
                    buffers.append(filler[gap])
            offset = int(starts[first])
            self._preadv(buffers, offset, int(starts[last - 1]) + run - offset)
            first = last

    def _preadv(self, buffers: list[memoryview], offset: int, total: int) -> None:
        done = os.preadv(self._fd, buffers, offset)
        if done != total:
            raise OSError(f"{self.path}: read {done} of {total} bytes at offset {offset} "
                          "(was the file truncated while loading?)")


def _well_formed(info: object) -> bool:
    """A header entry with a dtype name, a shape and two data offsets, all integers >= 0."""
    def counts(values: object) -> bool:
        return isinstance(values, list) and all(
            isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values)

    return (isinstance(info, dict) and isinstance(info.get("dtype"), str)
            and counts(info.get("shape")) and counts(info.get("data_offsets"))
            and len(info["data_offsets"]) == 2)


class TensorSlice:
    """One tensor of a SafetensorsFile, read on indexing: `get_shape()` and `slice[index]`
    with basic slices of step 1 (or `...`), as safetensors' slices offer;
    only the selected bytes are read."""

    def __init__(self, file: SafetensorsFile, name: str, dtype: torch.dtype,
                 shape: tuple[int, ...], offset: int):
        self.file, self.name, self.dtype, self.shape, self.offset = file, name, dtype, shape, offset

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def _bounds(self, index: object) -> list[tuple[int, int]]:
        if index is Ellipsis:
            index = ()
        elif not isinstance(index, tuple):
            index = (index,)
        if len(index) > len(self.shape) or not all(isinstance(s, slice) for s in index):
            raise IndexError(f"tensor {self.name!r} of shape {list(self.shape)}: index "
                             f"{index!r} is not supported; use up to {len(self.shape)} slices")
        bounds = []
        for dim, size in enumerate(self.shape):
            start, stop, step = (index[dim] if dim < len(index) else slice(None)).indices(size)
            if step != 1:
                raise IndexError(f"tensor {self.name!r}: slice step {step} on dim {dim} is "
                                 "not supported; only contiguous slices are read")
            bounds.append((start, max(start, stop)))
        return bounds

    def __getitem__(self, index: object) -> torch.Tensor:
        bounds = self._bounds(index)
        out = torch.empty([stop - start for start, stop in bounds], dtype=self.dtype)
        if out.numel() == 0:
            return out
        item = self.dtype.itemsize
        strides = [math.prod(self.shape[d + 1:]) * item for d in range(len(self.shape))]
        # One run per index of the dimensions before the last narrowed one: from there
        # inwards the selected bytes are contiguous.
        narrowed = [d for d, (start, stop) in enumerate(bounds)
                    if (start, stop) != (0, self.shape[d])]
        last = narrowed[-1] if narrowed else 0
        run = math.prod(stop - start for start, stop in bounds[last:]) * item
        starts = np.full(1, self.offset + sum(bounds[d][0] * strides[d]
                                              for d in range(last, len(bounds))), np.int64)
        for dim in range(last):
            start, stop = bounds[dim]
            starts = (starts[:, None] + np.arange(start, stop, dtype=np.int64) * strides[dim]
                      ).ravel()
        raw = out.reshape(-1).view(torch.uint8).numpy()
        self.file.read_runs(starts, run, memoryview(raw))
        return out
