"""Slices of safetensors tensors read with preadv: exactly the selected values, every run
layout (many runs, far apart, split reads), clear errors, and memory that grows by the
slice alone, not by the tensor it is cut from."""

import json
import random
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from shardline.models import safetensors_slices
from shardline.models.safetensors_slices import SafetensorsFile

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int8, torch.bool,
          torch.float8_e4m3fn]
SHAPES = [(), (7,), (5, 9), (3, 4, 6), (2, 3, 4, 5), (1, 300)]


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape) > 0.5
    if dtype.is_floating_point:
        return torch.randn(shape).to(dtype)
    return torch.randint(-100, 100, shape).to(dtype)


def random_index(shape: tuple[int, ...], rng: random.Random) -> tuple[slice, ...]:
    """Up to len(shape) slices, each the full range or a random (possibly empty) one."""
    index = []
    for size in shape[:rng.randint(0, len(shape))]:
        start = rng.randint(0, size)
        index.append(slice(start, rng.randint(start, size)) if rng.random() < 0.7
                     else slice(None))
    return tuple(index)


def assert_same(got: torch.Tensor, want: torch.Tensor) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    assert torch.equal(got.view(torch.uint8) if got.dtype.itemsize == 1 else got,
                       want.view(torch.uint8) if want.dtype.itemsize == 1 else want)


def test_random_slices_equal_the_tensor_sliced(tmp_path, fresh_seed):
    rng = random.Random(fresh_seed)
    tensors = {f"t{i}": random_tensor(shape, rng.choice(DTYPES))
               for i, shape in enumerate(SHAPES)}
    save_file(tensors, tmp_path / "m.safetensors")
    handle = SafetensorsFile(str(tmp_path / "m.safetensors"))
    try:
        assert sorted(handle.keys()) == sorted(tensors)
        for name, full in tensors.items():
            part = handle.get_slice(name)
            assert part.get_shape() == list(full.shape)
            assert_same(part[...], full)
            for _ in range(20):
                index = random_index(tuple(full.shape), rng)
                assert_same(part[index], full[index])
    finally:
        handle.close()


@pytest.mark.parametrize("shape,index,limits", [
    ((3000, 8), (slice(None), slice(2, 5)), {}),                     # more runs than IOV_MAX
    ((3, 100_000), (slice(None), slice(10, 20)), {}),                # runs beyond GAP_BYTES
    ((4, 1000), (slice(1, 3),), {"MAX_CALL_BYTES": 64}),             # one run split in reads
    ((50, 40), (slice(5, 45), slice(3, 30)), {"MAX_CALL_BYTES": 500, "GAP_BYTES": 64}),
    ((6, 5, 7), (slice(1, 5), slice(None), slice(2, 3)), {"GAP_BYTES": 0}),
])
def test_run_layouts(tmp_path, monkeypatch, fresh_seed, shape, index, limits):
    for name, value in limits.items():
        monkeypatch.setattr(safetensors_slices, name, value)
    full = random_tensor(shape, torch.float32 if shape[-1] > 8 else torch.int8)
    save_file({"w": full}, tmp_path / "m.safetensors")
    handle = SafetensorsFile(str(tmp_path / "m.safetensors"))
    try:
        assert_same(handle.get_slice("w")[index], full[index])
    finally:
        handle.close()


def test_unsupported_indexes_and_names_are_refused(tmp_path):
    save_file({"w": torch.zeros(4, 6)}, tmp_path / "m.safetensors")
    handle = SafetensorsFile(str(tmp_path / "m.safetensors"))
    try:
        part = handle.get_slice("w")
        with pytest.raises(IndexError, match=r"'w'.*step 2 on dim 1"):
            part[:, ::2]
        with pytest.raises(IndexError, match=r"'w' of shape \[4, 6\].*up to 2 slices"):
            part[0]
        with pytest.raises(IndexError, match="up to 2 slices"):
            part[:, :, :]
        with pytest.raises(KeyError, match="no tensor 'v'"):
            handle.get_slice("v")
    finally:
        handle.close()


def test_truncated_and_foreign_files_are_named(tmp_path):
    path = tmp_path / "m.safetensors"
    save_file({"a": torch.zeros(8), "w": torch.zeros(64, 64)}, path)
    data = path.read_bytes()
    path.write_bytes(data[:-100])
    with pytest.raises(ValueError, match=r"tensor 'w' of shape \[64, 64\] F32.*inside the file"):
        SafetensorsFile(str(path))
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="not a safetensors file"):
        SafetensorsFile(str(path))


def _with_header(header: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header + bytes(64)


@pytest.mark.parametrize("header, error", [
    (b"{garbage", "its header is not JSON"),
    (b"\xff\xfe{}", "its header is not JSON"),
    (b"[1, 2]", "its header is a JSON list"),
    (b'{"w": {"dtype": "F32", "shape": [4]}}', "tensor 'w' has no valid dtype, shape"),
    (b'{"w": {"dtype": "F32", "shape": ["4"], "data_offsets": [0, 16]}}', "tensor 'w' has no"),
    (b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0]}}', "tensor 'w' has no"),
    (b'{"w": [0, 16]}', "tensor 'w' has no"),
])
def test_a_malformed_header_is_named(tmp_path, header, error):
    path = tmp_path / "m.safetensors"
    path.write_bytes(_with_header(header))
    with pytest.raises(ValueError, match=f"{re.escape(str(path))}: .*{error}"):
        SafetensorsFile(str(path))


_MEMORY_PROBE = """
import json, os, sys, torch
from safetensors.torch import load_file
from shardline.layers.weights import copy_into, read_slice
from shardline.models.loader import CheckpointReader

def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

param = torch.zeros(2048, 2048)
reader = CheckpointReader(sys.argv[1])
before = rss()
copy_into(param, read_slice(reader.get_slice("w"), 1, 2048, 2048))
grown = rss() - before
reader.close()
full = load_file(sys.argv[1] + "/model.safetensors")["w"]
print(json.dumps({"grown": grown, "equal": torch.equal(param, full[:, 2048:4096])}))
"""


def test_a_column_slice_costs_its_own_bytes_not_the_tensors(tmp_path, fresh_seed):
    """Loading a quarter of the columns of a 64 MiB weight (a row-parallel slice at TP=4)
    into an existing parameter, as a weight_loader does, adds at most the 16 MiB slice
    itself to the process while the checkpoint is open, not the tensor's 64 MiB."""
    full = torch.randn(2048, 8192)
    save_file({"w": full}, tmp_path / "model.safetensors")
    done = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(tmp_path)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["equal"]
    assert result["grown"] < full.numel() * 4 // 2, result
