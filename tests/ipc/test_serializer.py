import re
import struct
import sys

import msgpack
import numpy as np
import pytest
import torch
from wire_values import (UNCOPYABLE_TORCH_DTYPES, as_received, assert_identical, random_key,
                         random_text, random_value)

from shardline.ipc.serializer import Decoder, Encoder, FrameError

NUMPY_DTYPES = [
    np.float32, np.float64, np.float16, np.int64, np.int8, np.uint8, np.bool_, np.complex64,
]
TORCH_DTYPES = [
    torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.uint8, torch.bool,
]
SHAPES = [(), (0,), (3, 0, 2), (7,), (5, 6), (2, 3, 4)]


def round_trip(obj: object) -> object:
    frame = bytearray(b"".join(Encoder().encode(obj)))
    return Decoder().decode(frame)


def random_array(rng: np.random.Generator, shape: tuple, dtype) -> np.ndarray:
    if np.dtype(dtype).kind == "b":
        return np.asarray(rng.random(shape) < 0.5)
    if np.dtype(dtype).kind == "c":
        return np.asarray(rng.standard_normal(shape) + 1j * rng.standard_normal(shape), dtype=dtype)
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        return rng.integers(info.min, info.max, size=shape, dtype=dtype, endpoint=True)
    return rng.standard_normal(shape).astype(dtype)


def random_tensor(shape: tuple, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bool:
        return torch.rand(shape) < 0.5
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        return torch.randint(info.min, info.max, shape, dtype=dtype)
    return torch.randn(shape).to(dtype)


def assert_same_array(got: object, expected: np.ndarray) -> None:
    assert isinstance(got, np.ndarray)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert np.array_equal(got, expected)


def assert_same_tensor(got: object, expected: torch.Tensor) -> None:
    assert isinstance(got, torch.Tensor)
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(got, expected)


@pytest.mark.parametrize("dtype", NUMPY_DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_numpy_array_round_trip(dtype, shape):
    array = random_array(np.random.default_rng(), shape, dtype)
    assert_same_array(round_trip(array), array)


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_torch_tensor_round_trip(dtype, shape):
    tensor = random_tensor(shape, dtype)
    assert_same_tensor(round_trip(tensor), tensor)


def test_non_contiguous_inputs_arrive_equal_and_contiguous():
    rng = np.random.default_rng()
    array = random_array(rng, (6, 8), np.int64)
    tensor = random_tensor((6, 8), torch.bfloat16)
    inputs = {
        "transposed": array.T,
        "strided": array[::2, 1::3],
        "fortran": np.asfortranarray(array),
        "negative_stride": array[::-1],
        "t_transposed": tensor.t(),
        "t_strided": tensor[1::2, ::3],
        "t_expanded": torch.randn(1, 5).expand(4, 5),
        "t_conj": torch.randn(3, dtype=torch.complex64).conj(),
    }
    out = round_trip(inputs)
    for key, value in inputs.items():
        if isinstance(value, np.ndarray):
            assert_same_array(out[key], value)
            assert out[key].flags.c_contiguous
        else:
            assert_same_tensor(out[key], value.resolve_conj())
            assert out[key].is_contiguous()


def test_nested_structure_round_trip():
    rng = np.random.default_rng()
    token_ids = rng.integers(0, 50_000, size=int(rng.integers(1, 100))).tolist()
    obj = {
        "req_id": f"req-{rng.integers(1 << 30)}",
        "token_ids": token_ids,
        "nested": [
            {"logits": random_tensor((3, 5), torch.float32)},
            [random_array(rng, (4,), np.float16), None],
        ],
        7: b"\x00raw\xff",
        "flags": [True, False, None, 1.5, -(2**63), 2**64 - 1],
        "empty": {"list": [], "dict": {}, "str": "", "bytes": b""},
    }
    out = round_trip(obj)
    assert out.keys() == obj.keys()
    assert out["req_id"] == obj["req_id"] and out["token_ids"] == token_ids
    assert_same_tensor(out["nested"][0]["logits"], obj["nested"][0]["logits"])
    assert_same_array(out["nested"][1][0], obj["nested"][1][0])
    assert out["nested"][1][1] is None
    assert out[7] == obj[7] and out["flags"] == obj["flags"] and out["empty"] == obj["empty"]


def test_numpy_scalars_keep_their_type():
    rng = np.random.default_rng()
    scalars = [
        np.int64(rng.integers(-(2**62), 2**62)),
        np.float32(rng.standard_normal()),
        np.bool_(True),
        np.uint8(200),
    ]
    out = round_trip(scalars)
    for got, expected in zip(out, scalars, strict=True):
        assert type(got) is type(expected) and got == expected


def test_every_str_round_trips_lone_surrogates_included(rng):
    texts = [random_text(rng) for _ in range(200)]
    texts += ["\ud800", "a\udfffb", "\udc00\ud800", "\U0001F600", ""]
    encoder, decoder = Encoder(), Decoder()
    for text in texts:
        message = {text: [text, {"stop": [text]}], "n": rng.randrange(2**63)}
        assert decoder.decode(bytearray(b"".join(encoder.encode(message)))) == message
    assert round_trip([np.arange(3), "\ud800"])[1] == "\ud800"


def test_random_messages_arrive_identical(rng):
    encoder, decoder = Encoder(), Decoder()
    for _ in range(300):
        message = random_value(rng)
        got = decoder.decode(bytearray(b"".join(encoder.encode(message))))
        assert_identical(got, as_received(message))


def test_dict_keys_that_are_tuples_arrive_as_tuples(rng):
    keys = [tuple(random_key(rng) for _ in range(rng.randint(0, 3))) for _ in range(20)]
    message = {"step": [{key: rng.randrange(2**63)} for key in keys], (1, (2, "x")): np.arange(3)}
    assert_identical(round_trip([torch.ones(2), message])[1], as_received(message))


def test_tuples_arrive_as_lists_and_bytearray_as_bytes():
    got = round_trip({"shape": (2, (3, 4)), "raw": bytearray(b"ab")})
    assert got == {"shape": [2, [3, 4]], "raw": b"ab"}


def test_arrays_share_the_frame_aligned():
    rng = np.random.default_rng()
    size = int(rng.integers(1, 50))
    obj = [random_array(rng, (size,), np.uint8), random_tensor((3, 3), torch.int64)]
    frame = bytearray(b"".join(Encoder().encode(obj)))
    array, tensor = Decoder().decode(frame)
    frame_start = np.frombuffer(frame, np.uint8).ctypes.data
    for address in (array.ctypes.data, tensor.data_ptr()):
        assert frame_start <= address < frame_start + len(frame)
        assert (address - frame_start) % 64 == 0
    frame[-1] ^= 0xFF
    assert tensor.view(torch.uint8).flatten()[-1] == frame[-1]


def test_contiguous_inputs_are_encoded_without_copy():
    array = random_array(np.random.default_rng(), (128,), np.float32)
    tensor = random_tensor((16, 4), torch.bfloat16)
    parts = Encoder().encode({"a": array, "t": tensor})
    assert any(part is array for part in parts)
    addresses = [part.ctypes.data for part in parts if isinstance(part, np.ndarray)]
    assert tensor.data_ptr() in addresses


class Opaque:
    pass


@pytest.mark.parametrize(
    "obj, message",
    [
        (Opaque(), "test_serializer.Opaque"),
        ({"nested": [{1, 2}]}, "type set"),
        (np.array([object()]), "dtype object"),
        (np.ma.masked_array([1, 2], mask=[0, 1]), "MaskedArray"),
        (np.zeros(2, dtype=[("a", "<i4")]), "dtype"),
        (torch.empty(2, device="meta"), "device meta"),
        (torch.eye(3).to_sparse(), "layout torch.sparse_coo"),
        (2**64, "64 bits"),
        (-(2**63) - 1, "64 bits"),
    ],
    ids=[
        "class", "set", "object_array", "masked_array", "structured_array",
        "meta_tensor", "sparse_tensor", "big_int", "small_int",
    ],
)
def test_unsupported_objects_raise_type_error(obj, message):
    with pytest.raises(TypeError, match=message):
        Encoder().encode(obj)


def random_unsupported(rng) -> tuple[object, str]:
    """A value the serializer refuses, and a pattern its error message must match."""
    bits = rng.randint(65, 20_000)  # past 4300 digits str() of the int itself raises
    big = rng.choice([1, -1]) * (2**64 + rng.getrandbits(bits))
    strided = torch.zeros(4, 8, dtype=torch.uint8).view(rng.choice(UNCOPYABLE_TORCH_DTYPES))
    return rng.choice([
        (Opaque(), "test_serializer.Opaque"),
        ({rng.randrange(9)}, "type set"),
        (complex(rng.random(), 1), "type complex"),
        (big, f"int {big}:" if abs(big).bit_length() <= 128 else f"{abs(big).bit_length()} bits"),
        (-(2**63) - 1 - rng.randrange(2**62), "64 bits"),
        (torch.empty(rng.randint(0, 3), device="meta"), "device meta"),
        (np.array([None, rng.random()]), "dtype object"),
        (strided[:, ::2], f"non-contiguous torch.Tensor of dtype {strided.dtype}"),
    ])


def nest_at_random_path(rng, leaf: object) -> tuple[object, str]:
    """`leaf` placed at a random depth among supported siblings, and its path as the
    encoder's error names it."""
    obj, path = leaf, ""
    for _ in range(rng.randint(0, 4)):
        before = [random_value(rng, depth=4) for _ in range(rng.randint(0, 3))]
        after = [random_value(rng, depth=4) for _ in range(rng.randint(0, 3))]
        if rng.random() < 0.5:
            obj, path = (before + [obj] + after), f"[{len(before)}]{path}"
        else:
            key = rng.choice([rng.randrange(-99, 99), "".join(rng.choices("abcxyz_", k=5))])
            siblings = {f"s{i}": value for i, value in enumerate(before + after)}
            obj, path = {**siblings, key: obj}, f"[{key!r}]{path}"
    return obj, "message" + path


def test_unsupported_value_is_refused_by_its_path_and_the_encoder_goes_on(rng):
    encoder, decoder = Encoder(), Decoder()
    for _ in range(100):
        bad, message = random_unsupported(rng)
        obj, path = nest_at_random_path(rng, bad)
        with pytest.raises(TypeError) as error:
            encoder.encode(obj)
        assert str(error.value).startswith(f"{path}: cannot serialize ")
        assert re.search(re.escape(message), str(error.value))
        good = random_value(rng)
        assert_identical(decoder.decode(bytearray(b"".join(encoder.encode(good)))),
                         as_received(good))


def test_unsupported_dict_key_is_named():
    with pytest.raises(TypeError, match=r"^message\['a'\], the key \(1, <object .*: cannot "
                                         "serialize an object of type object"):
        Encoder().encode({"a": {"ok": 1, (1, object()): 2}})


def test_unsupported_value_nested_past_the_python_recursion_limit_is_still_a_type_error():
    depth = sys.getrecursionlimit() + 10  # msgpack itself nests up to 1024
    message = {"bad": set()}
    for _ in range(depth):
        message = [message]
    with pytest.raises(TypeError, match="cannot serialize an object of type set"):
        Encoder().encode(message)


def test_encoder_is_reusable_after_an_error():
    encoder = Encoder()
    with pytest.raises(TypeError):
        encoder.encode([np.arange(3), Opaque()])
    array = np.arange(5)
    assert_same_array(Decoder().decode(bytearray(b"".join(encoder.encode(array)))), array)


@pytest.mark.parametrize("where", ["header", "meta", "all_buffers", "last_buffer_byte"])
def test_truncated_frame_raises_value_error(where):
    parts = Encoder().encode({"x": np.arange(int(np.random.default_rng().integers(1, 100)))})
    frame = b"".join(parts)
    meta_end = len(parts[0]) + len(parts[1])
    cut = {"header": 2, "meta": 5, "all_buffers": meta_end, "last_buffer_byte": -1}[where]
    with pytest.raises(FrameError, match="truncated|too short"):
        Decoder().decode(bytearray(frame[:cut]))


def test_trailing_bytes_raise_value_error():
    frame = b"".join(Encoder().encode([1, 2]))
    with pytest.raises(FrameError, match="past its last buffer"):
        Decoder().decode(bytearray(frame + b"\x00"))


def test_array_header_that_does_not_match_its_buffer_raises_value_error():
    nbytes = int(np.random.default_rng().integers(1, 8)) * 8
    meta = msgpack.packb(msgpack.ExtType(1, msgpack.packb(("<i8", [nbytes], nbytes))))
    padding = bytes(-(4 + len(meta)) % 64)
    frame = bytearray(struct.pack("<I", len(meta)) + meta + padding + bytes(nbytes))
    with pytest.raises(FrameError, match="declares shape"):
        Decoder().decode(frame)
