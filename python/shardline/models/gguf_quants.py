"""Dequantizing the GGUF tensor types shardline loads: F32, F16, BF16, Q8_0, Q4_0, Q4_1.

The quantized types store each row in blocks of 32 values along the row (ggml's layout):
- Q8_0: a float16 scale d, then 32 signed bytes q; value = d * q.
- Q4_0: a float16 scale d, then 16 bytes of 4-bit codes (the low nibbles are values 0-15 of
  the block, the high nibbles values 16-31); value = d * (code - 8).
- Q4_1: a float16 scale d and a float16 offset m, then 16 bytes of codes as in Q4_0;
  value = d * code + m.
All arithmetic is done in float32; the loader then casts to the engine's dtype.
"""

from __future__ import annotations

import math

import torch

BLOCK = 32
# type name -> bytes per block of BLOCK values (plain types: bytes per value, block of 1)
BLOCK_BYTES = {"Q8_0": 2 + BLOCK, "Q4_0": 2 + BLOCK // 2, "Q4_1": 4 + BLOCK // 2}
PLAIN_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
SUPPORTED_TYPES = (*PLAIN_TYPES, *BLOCK_BYTES)


def tensor_nbytes(type_name: str, shape: tuple[int, ...]) -> int:
    """Bytes that a tensor of `shape` (torch order: the last dimension is the row) takes."""
    if type_name in PLAIN_TYPES:
        return math.prod(shape) * PLAIN_TYPES[type_name].itemsize
    return math.prod(shape) // BLOCK * BLOCK_BYTES[type_name]


def check_type(type_name: str, shape: tuple[int, ...], tensor: str) -> None:
    """ValueError naming the tensor if shardline cannot dequantize it."""
    if type_name not in SUPPORTED_TYPES:
        raise ValueError(f"GGUF tensor {tensor!r} has type {type_name}, which shardline cannot "
                         f"load: supported types are {', '.join(SUPPORTED_TYPES)}")
    if type_name in BLOCK_BYTES and shape[-1] % BLOCK:
        raise ValueError(f"GGUF tensor {tensor!r} of type {type_name} has rows of {shape[-1]} "
                         f"values, not a multiple of the block size {BLOCK}")


def _half(raw: torch.Tensor, block_bytes: int, start: int) -> torch.Tensor:
    """The float16 at byte `start` (even) of every block, as a float32 column; the blocks
    are an even number of bytes, so the bytes view as float16 without a copy."""
    halves = raw.view(torch.float16).reshape(-1, block_bytes // 2)
    return halves[:, start // 2:start // 2 + 1].float()


def _codes(packed: torch.Tensor) -> torch.Tensor:
    """[blocks, 16] bytes -> [blocks, 32] float codes: all low nibbles, then all high ones."""
    codes = torch.empty(packed.shape[0], BLOCK, dtype=torch.uint8)
    torch.bitwise_and(packed, 0x0F, out=codes[:, :BLOCK // 2])
    torch.bitwise_right_shift(packed, 4, out=codes[:, BLOCK // 2:])
    return codes.float()


def dequantize(raw: torch.Tensor, type_name: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The float32 values of a tensor of `shape` stored as the bytes `raw` (uint8, 1-D)."""
    if type_name in PLAIN_TYPES:
        return raw.view(PLAIN_TYPES[type_name]).float().reshape(shape)
    size = BLOCK_BYTES[type_name]
    blocks = raw.reshape(-1, size)
    if type_name == "Q8_0":
        values = blocks[:, 2:].contiguous().view(torch.int8).float().mul_(_half(raw, size, 0))
    elif type_name == "Q4_0":
        values = _codes(blocks[:, 2:]).sub_(8.0).mul_(_half(raw, size, 0))
    else:
        values = torch.addcmul(_half(raw, size, 2), _codes(blocks[:, 4:]), _half(raw, size, 0))
    return values.reshape(shape)
