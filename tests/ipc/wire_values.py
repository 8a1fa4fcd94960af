"""Random values of every type the rings' serializer carries, what the reader must get for
each (the rules of serializer's docstring), and an exact comparison: shared by the
serializer's and the message queue's tests."""

import math
import struct

import numpy as np
import torch

def random_text(rng, max_len: int = 12) -> str:
    """Code points of every kind: ASCII, the rest of the BMP, other planes, and surrogates,
    lone or paired (Python keeps a pair as two code points, as JSON's "\\ud83d\\ude00" gives)."""
    ranges = [(0, 0x7F), (0x80, 0xD7FF), (0xD800, 0xDFFF), (0xE000, 0xFFFF), (0x10000, 0x10FFFF)]
    return "".join(chr(rng.randint(*rng.choice(ranges))) for _ in range(rng.randint(0, max_len)))


INT_EDGES = [0, 1, -1, 2**63 - 1, -(2**63), 2**63, 2**64 - 1]
FLOAT_EDGES = [0.0, -0.0, math.inf, -math.inf, math.nan, 5e-324, 1.7976931348623157e308]
WIRE_NUMPY_DTYPES = [
    "?", "i1", "u1", "<i2", "<u2", "<i4", ">i4", "<u4", "<i8", "<u8", "<f2", "<f4", "<f8",
    ">f8", "<c8", "<c16", np.dtype(np.longdouble).str, "<M8[ns]", "<m8[s]", "<U3", "|S5",
]
# Every dtype torch can make from bytes; the sub-byte ones (int1..uint7) and the quantized
# ones cannot be copied, so they appear only contiguous.
WIRE_TORCH_DTYPES = [
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.uint16, torch.int32, torch.uint32,
    torch.int64, torch.uint64, torch.float16, torch.bfloat16, torch.float32, torch.float64,
    torch.complex32, torch.complex64, torch.complex128, torch.float8_e4m3fn, torch.float8_e5m2,
    torch.float8_e4m3fnuz, torch.float8_e5m2fnuz, torch.bits8, torch.bits16,
]
UNCOPYABLE_TORCH_DTYPES = [torch.uint4, torch.int1, torch.quint8, torch.qint32]


def random_float(rng) -> float:
    if rng.random() < 0.3:
        return rng.choice(FLOAT_EDGES)
    return struct.unpack("<d", rng.randbytes(8))[0]  # any bit pattern, NaN payloads too


def random_ndarray(rng) -> np.ndarray:
    dtype = np.dtype(rng.choice(WIRE_NUMPY_DTYPES))
    shape = tuple(rng.randint(0, 4) for _ in range(rng.randint(0, 3)))
    count = math.prod(shape)
    if dtype.kind == "b":
        array = np.array([rng.random() < 0.5 for _ in range(count)], dtype).reshape(shape)
    else:
        array = np.frombuffer(rng.randbytes(count * dtype.itemsize), dtype).reshape(shape).copy()
        if dtype.kind == "U":  # code points past U+10FFFF make invalid str scalars
            array.reshape(-1).view("<u4")[...] %= 0x110000
    view = rng.choice(["whole", "transposed", "strided", "reversed", "fortran"])
    if view == "transposed":
        return array.T
    if view == "strided" and array.ndim:
        return array[:: rng.randint(2, 3)]
    if view == "reversed" and array.ndim:
        return array[::-1]
    return np.asfortranarray(array) if view == "fortran" else array


def random_wire_tensor(rng) -> torch.Tensor:
    copyable = rng.random() < 0.85
    dtype = rng.choice(WIRE_TORCH_DTYPES if copyable else UNCOPYABLE_TORCH_DTYPES)
    shape = [rng.randint(0, 4) for _ in range(rng.randint(0, 3))]
    count = math.prod(shape)
    if dtype == torch.bool:
        tensor = torch.rand(shape) < 0.5
    else:
        nbytes = count * dtype.itemsize  # frombuffer refuses an empty buffer: one byte more
        raw = torch.frombuffer(bytearray(rng.randbytes(nbytes + 1)), dtype=torch.uint8)
        tensor = raw[:nbytes].view(dtype).reshape(shape)
    views = ["whole", "transposed", "strided", "expanded", "offset"]
    view = rng.choice(views) if copyable else "whole"
    if view == "transposed":
        return tensor.mT if tensor.dim() >= 2 else tensor
    if view == "strided" and tensor.dim():
        return tensor[:: rng.randint(2, 3)]
    if view == "expanded":
        return tensor.reshape(1, -1).expand(rng.randint(0, 3), -1)
    if view == "offset" and count:
        return tensor.reshape(-1)[rng.randrange(count):]
    return tensor


def random_key(rng) -> object:
    kind = rng.randrange(6)
    if kind == 0:
        return random_text(rng)
    if kind == 1:
        return rng.choice([*INT_EDGES, rng.randint(-(2**63), 2**64 - 1)])
    if kind == 2:
        return rng.choice([None, True, False, rng.randbytes(rng.randint(0, 5))])
    if kind == 3:
        return rng.uniform(-1e9, 1e9)
    return tuple(random_key(rng) for _ in range(rng.randint(0, 3)))


def random_value(rng, depth: int = 0) -> object:
    kind = rng.randrange(14 if depth < 4 else 10)
    if kind == 0:
        return rng.choice([None, True, False])
    if kind == 1:
        return rng.choice([*INT_EDGES, rng.randint(-(2**63), 2**64 - 1)])
    if kind == 2:
        return random_float(rng)
    if kind == 3:
        return random_text(rng)
    if kind == 4:
        raw = rng.randbytes(rng.choice([0, rng.randint(1, 300)]))
        return bytearray(raw) if rng.random() < 0.3 else raw
    if kind == 5:
        return random_ndarray(rng)
    if kind == 6:
        array = random_ndarray(rng)
        return array.reshape(-1)[0] if array.size else np.uint64(2**64 - 1)
    if kind in (7, 8, 9):
        return random_wire_tensor(rng)
    items = [random_value(rng, depth + 1) for _ in range(rng.choice([0, rng.randint(1, 5)]))]
    if kind == 10:
        return items
    if kind == 11:
        return tuple(items)
    return {random_key(rng): item for item in items}


def as_received(obj: object, key: bool = False) -> object:
    """What the reader gets for `obj`: the module docstring's rules."""
    if isinstance(obj, tuple):
        items = [as_received(item, key) for item in obj]
        return tuple(items) if key else items
    if isinstance(obj, list):
        return [as_received(item) for item in obj]
    if isinstance(obj, dict):
        return {as_received(k, key=True): as_received(v) for k, v in obj.items()}
    if isinstance(obj, bytearray):
        return bytes(obj)
    if isinstance(obj, np.generic):  # np.float64, np.str_, np.bytes_ subclass their base
        for base in (float, str, bytes):
            if isinstance(obj, base):
                return base(obj)
    return obj


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    if tensor.dtype not in UNCOPYABLE_TORCH_DTYPES:  # a fresh copy: strides of size-1 dims too
        tensor = torch.empty(tensor.shape, dtype=tensor.dtype).copy_(tensor)
    return bytes(tensor.reshape(-1).view(torch.uint8).numpy()) if tensor.numel() else b""


def assert_identical(got: object, expected: object, path: str = "") -> None:
    """Equal type, value and bits: floats by their bit pattern, arrays and tensors by
    dtype, shape and bytes."""
    assert type(got) is type(expected), f"{path}: {type(got)} is not {type(expected)}"
    if isinstance(expected, float):
        assert struct.pack("<d", got) == struct.pack("<d", expected), f"{path}: {got} != {expected}"
    elif isinstance(expected, (list, tuple)):
        assert len(got) == len(expected), path
        for i, (g, e) in enumerate(zip(got, expected)):
            assert_identical(g, e, f"{path}[{i}]")
    elif isinstance(expected, dict):
        assert len(got) == len(expected), path
        for (gk, gv), (ek, ev) in zip(got.items(), expected.items()):
            assert_identical(gk, ek, f"{path} key {ek!r}")
            assert_identical(gv, ev, f"{path}[{ek!r}]")
    elif isinstance(expected, np.ndarray):
        assert got.dtype.str == expected.dtype.str and got.shape == expected.shape, path
        assert got.flags.c_contiguous and got.tobytes() == expected.tobytes(), path
    elif isinstance(expected, np.generic):
        assert got.dtype.str == expected.dtype.str and got.tobytes() == expected.tobytes(), path
    elif isinstance(expected, torch.Tensor):
        assert got.dtype == expected.dtype and got.shape == expected.shape, path
        assert got.is_contiguous() and tensor_bytes(got) == tensor_bytes(expected), path
    else:
        assert got == expected, f"{path}: {got!r} != {expected!r}"
