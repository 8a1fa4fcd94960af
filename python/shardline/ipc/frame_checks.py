"""Checks of what a frame says about itself, made before anything is allocated for it.

A frame read from a ring may be corrupt. The decoder (serializer.Decoder) hands each
msgpack extension's header here: the header must be the fields an Encoder writes, a dtype
the encoder could have sent, and a shape that fills exactly the bytes it declares and
that numpy and torch can make. Anything else raises FrameError naming what is wrong, so
that no declared size makes the decoder allocate more than an empty array.
"""

from __future__ import annotations

import functools
import math
import reprlib
import sys

import msgpack
import numpy as np

# The msgpack extension codes of the frame's out-of-band values
EXT_NDARRAY = 1
EXT_TENSOR = 2
EXT_NUMPY_SCALAR = 3

# numpy kinds whose `dtype.str` names the dtype completely (no objects, no structured records)
NUMPY_KINDS = frozenset("biufcmMSU")
# numpy's limit on dimensions, and the bound that sizes and strides must stay under
_MAX_NDIM = 64
_MAX_SIZE = 2**63
EXT_NAMES = {EXT_NDARRAY: "numpy array", EXT_TENSOR: "torch tensor",
             EXT_NUMPY_SCALAR: "numpy scalar"}


class FrameError(ValueError):
    """A frame read from a ring is not one an Encoder makes: the message says what is
    wrong (a length, an array header, the msgpack bytes) and where in the frame."""


def ext_fields(code: int, data: bytes, types: tuple[type, ...]) -> list:
    """The fields of an extension's header (its msgpack payload), checked to be one value
    of each of `types`."""
    what = EXT_NAMES[code]
    try:
        fields = msgpack.unpackb(data)
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise FrameError(f"the header of a {what} in the frame is malformed: "
                         f"{type(exc).__name__}: {exc}") from None
    if (not isinstance(fields, list) or len(fields) != len(types)
            or any(type(field) is not kind for field, kind in zip(fields, types))):
        expected = ", ".join(kind.__name__ for kind in types)
        raise FrameError(f"the header of a {what} in the frame is {reprlib.repr(fields)}, "
                         f"not [{expected}]")
    return fields


def check_layout(code: int, shape: list, itemsize: int, nbytes: int) -> None:
    """Refuse an array header whose shape, item size and byte count disagree, or whose
    shape numpy and torch cannot make (too many dimensions, sizes or strides past 64 bits),
    before anything is allocated for it."""
    if (len(shape) > _MAX_NDIM or any(type(n) is not int or n < 0 for n in shape)
            or math.prod(shape) * itemsize != nbytes
            or math.prod(max(n, 1) for n in shape) * max(itemsize, 1) >= _MAX_SIZE):
        raise FrameError(
            f"the header of a {EXT_NAMES[code]} in the frame declares shape "
            f"{reprlib.repr(shape)} of {itemsize}-byte items in {nbytes} bytes: "
            f"not a shape of at most {_MAX_NDIM} sizes >= 0 that fills exactly those bytes"
        )


def check_scalar_bytes(dtype: np.dtype, raw: bytes) -> None:
    """Refuse a numpy scalar's bytes that are not one item of `dtype`, or a str scalar
    numpy cannot make."""
    if len(raw) != dtype.itemsize or not raw:
        raise FrameError(f"a numpy scalar of dtype {dtype} in the frame has {len(raw)} bytes, "
                         f"not {dtype.itemsize}")
    if dtype.kind == "U":  # numpy cannot make a str of a code point past U+10FFFF
        code_points = np.frombuffer(raw, dtype.byteorder.replace("|", "=") + "u4")
        if code_points.max() > sys.maxunicode:
            raise FrameError(f"a numpy scalar of dtype {dtype} in the frame holds code point "
                             f"{int(code_points.max())}, past U+10FFFF")


@functools.lru_cache(maxsize=256)  # bounded: a corrupt frame can name endless dtypes
def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype of a wire name (a cached `np.dtype(name)`), refused unless the
    encoder could have sent it."""
    try:
        dtype = np.dtype(name)
    except (TypeError, ValueError, SyntaxError) as exc:
        raise FrameError(f"unknown numpy dtype {name!r} in frame: {exc}") from None
    if dtype.kind not in NUMPY_KINDS or dtype.fields is not None or dtype.str != name:
        raise FrameError(f"numpy dtype {name!r} in frame is not one the encoder sends "
                         f"(it sends dtype.str of kinds {''.join(sorted(NUMPY_KINDS))})")
    return dtype
