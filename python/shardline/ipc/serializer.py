"""Message encoding for the shared-memory rings: msgpack for structure, raw bytes for arrays.

Numpy arrays and CPU torch tensors travel out of band: msgpack carries only their dtype,
shape and size, and their bytes follow the msgpack part unchanged, so a large array is
neither pickled nor copied into the msgpack buffer. The reader builds arrays that share
the received buffer instead of copying out of it. No pickle anywhere.

Frame layout (little-endian):

    u32 meta_len | meta_len bytes of msgpack | buffer 0 | buffer 1 | ...

Each non-empty buffer starts at a 64-byte boundary of the frame (zero padding before it)
so that arrays decoded in place are aligned; empty buffers take no space. Buffers appear
in the order their arrays appear in the msgpack stream.

What round-trips: None, bool, int (64-bit range), float, str, bytes, list, dict,
numpy arrays and scalars, CPU torch tensors (any dtype incl. bfloat16, float8 and bool;
shape kept, non-contiguous inputs arrive contiguous, except that torch cannot copy a
non-contiguous tensor of a sub-byte or quantized dtype, so those are refused). Tuples
arrive as lists and bytearrays as bytes, as msgpack has no distinct types for them, except
that a dict key that is a tuple arrives as a tuple (a list cannot be a key); subclasses of
the above (IntEnum, OrderedDict, and numpy's float64, str_ and bytes_ scalars) arrive as
their base type. Any str arrives equal, lone surrogates (from JSON "\\ud800" escapes,
say) included.

A frame that is not one an Encoder made (corrupt bytes, a truncated or extended buffer)
raises FrameError, a ValueError whose message says what is wrong and where, or decodes to
whatever value its bytes now hold: a changed byte inside a str or a buffer changes the data,
not the structure. Every length, shape and size it declares is checked against the frame
before anything is allocated (frame_checks), so no declared size makes the decoder
allocate more than an empty array.

torch is imported only once a tensor is decoded, so processes that exchange plain data
and numpy arrays start without paying for it.
"""

from __future__ import annotations

import contextlib
import functools
import reprlib
import struct
import sys
import warnings
from typing import TYPE_CHECKING

import msgpack
import numpy as np

from shardline.ipc.frame_checks import (EXT_NDARRAY, EXT_NUMPY_SCALAR, EXT_TENSOR,
                                        NUMPY_KINDS, FrameError, check_layout,
                                        check_scalar_bytes, ext_fields, numpy_dtype)

if TYPE_CHECKING:
    from collections.abc import Iterator

    import torch

Part = bytes | memoryview | np.ndarray

_HEADER = struct.Struct("<I")
_ALIGN = 64
_PADDING = [bytes(n) for n in range(_ALIGN)]

# msgpack.ExtType checks its fields in Python on every construction; the encoder only
# builds valid ones, and this skips the check on the hot path.
_ext_type = functools.partial(tuple.__new__, msgpack.ExtType)

SUPPORTED_TYPES = (
    "None, bool, int, float, str, bytes, list, tuple (decoded as list), dict, "
    "numpy arrays (np.ndarray itself, not subclasses: use np.asarray) and scalars of numeric, "
    "bool, datetime or string dtype, CPU torch tensors"
)


class Encoder:
    """Turns one object into the parts of one frame, for `Ring.write_parts`.

    Reusable and not thread-safe: one encoder per writing thread.
    """

    def __init__(self) -> None:
        self._packer = msgpack.Packer(default=self._encode_ext, use_bin_type=True)
        # For the rare str that holds a lone surrogate, which strict UTF-8 cannot encode;
        # the strict packer stays the default, as this one is slower on every str.
        self._surrogate_packer = msgpack.Packer(
            default=self._encode_ext, use_bin_type=True, unicode_errors="surrogatepass"
        )
        self._ext_packer = msgpack.Packer(use_bin_type=True)
        self._buffers: list[np.ndarray] = []

    def encode(self, obj: object) -> list[Part]:
        """The frame for `obj` as a list of buffers whose concatenation is the message.

        Array parts are the arrays themselves (or a contiguous copy when an input is not
        C-contiguous): keep `obj` unchanged until the parts are written.
        Raises TypeError for anything outside SUPPORTED_TYPES, naming where in `obj` it is
        (e.g. `message[2][0]['new_requests']`).
        """
        try:
            meta = self._pack(obj)
        except TypeError as exc:
            try:
                where = self._first_refused(obj, "message")
            except RecursionError:  # msgpack nests 1024 deep, Python's own limit is lower
                where = None
            if where is None:
                raise
            raise TypeError(f"{where}: {exc}") from None
        finally:
            buffers, self._buffers = self._buffers, []
        if not buffers:
            return [_HEADER.pack(len(meta)) + meta]
        parts: list[Part] = [_HEADER.pack(len(meta)), meta]
        offset = _HEADER.size + len(meta)
        for buf in buffers:
            pad = -offset % _ALIGN
            if pad:
                parts.append(_PADDING[pad])
            parts.append(buf)
            offset += pad + buf.nbytes
        return parts

    def _pack(self, obj: object) -> bytes:
        try:
            return self._packer.pack(obj)
        except UnicodeEncodeError:
            self._buffers = []
            return self._surrogate_packer.pack(obj)

    def _first_refused(self, obj: object, path: str) -> str | None:
        """The path of the first value in `obj` that cannot be packed on its own (None if
        there is none): walked only after packing failed, to say where."""
        if isinstance(obj, dict):
            for key, value in obj.items():
                if self._first_refused(key, "") is not None:
                    return f"{path}, the key {reprlib.repr(key)}"
                where = self._first_refused(value, f"{path}[{reprlib.repr(key)}]")
                if where is not None:
                    return where
            return None
        if isinstance(obj, (list, tuple)):
            for index, item in enumerate(obj):
                where = self._first_refused(item, f"{path}[{index}]")
                if where is not None:
                    return where
            return None
        try:
            self._pack(obj)
        except TypeError:
            return path
        return None

    def _encode_ext(self, obj: object) -> msgpack.ExtType:
        # Exact type: subclasses (masked arrays, memmaps) carry state that would be lost.
        if type(obj) is np.ndarray:
            return self._encode_ndarray(obj)
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(obj, torch.Tensor):
            return self._encode_tensor(obj)
        if isinstance(obj, np.generic):
            meta = (_numpy_dtype_name(obj.dtype), obj.tobytes())
            return _ext_type((EXT_NUMPY_SCALAR, self._ext_packer.pack(meta)))
        if isinstance(obj, int):
            # Past 4300 digits str(int) itself raises; past a few dozen the digits say nothing.
            bits = obj.bit_length()
            what = f"the int {obj}" if bits <= 128 else f"an int of {bits} bits"
            raise TypeError(
                f"cannot serialize {what}: ints must fit in (un)signed 64 bits, "
                "[-2**63, 2**64 - 1]"
            )
        raise TypeError(
            f"cannot serialize an object of type {_type_name(obj)}; supported: {SUPPORTED_TYPES}"
        )

    def _encode_ndarray(self, array: np.ndarray) -> msgpack.ExtType:
        name = _numpy_dtype_name(array.dtype)
        if not array.flags.c_contiguous:
            array = array.copy(order="C")
        self._add_buffer(array)
        return _ext_type((EXT_NDARRAY, self._ext_packer.pack((name, array.shape, array.nbytes))))

    def _encode_tensor(self, tensor: torch.Tensor) -> msgpack.ExtType:
        import torch

        if not tensor.is_cpu:
            raise TypeError(
                f"cannot serialize a torch.Tensor on device {tensor.device}: only CPU tensors "
                "are supported; move it with .cpu() first"
            )
        if tensor.layout != torch.strided or tensor.is_quantized:
            raise TypeError(
                f"cannot serialize a torch.Tensor with layout {tensor.layout} and dtype "
                f"{tensor.dtype}: only dense (strided), non-quantized tensors are supported"
            )
        if tensor.requires_grad:
            tensor = tensor.detach()
        if tensor.is_conj() or tensor.is_neg():
            tensor = tensor.resolve_conj().resolve_neg()
        if not tensor.is_contiguous():
            try:
                with _quiet_dtype_warnings():
                    tensor = tensor.contiguous()
            except RuntimeError as exc:  # torch copies neither sub-byte nor quantized dtypes
                raise TypeError(
                    f"cannot serialize a non-contiguous torch.Tensor of dtype {tensor.dtype}: "
                    f"torch cannot copy it to a contiguous one ({exc})"
                ) from None
        name, carrier = _tensor_codec(tensor.dtype)
        array = (tensor if carrier is None else tensor.view(carrier)).numpy()
        self._add_buffer(array)
        return _ext_type((EXT_TENSOR, self._ext_packer.pack((name, array.shape, array.nbytes))))

    def _add_buffer(self, array: np.ndarray) -> None:
        if array.nbytes:
            self._buffers.append(array)


class Decoder:
    """Turns one received frame back into the object. Reusable, not thread-safe.

    Decoded arrays and tensors share memory with the frame: give `decode` a writable
    buffer (the ring's bytearray) to get writable arrays.
    """

    def __init__(self) -> None:
        self._frame: bytes | bytearray | None = None
        self._frame_len = 0
        self._cursor = 0
        # surrogatepass costs nothing on valid UTF-8; it only lets lone surrogates through.
        self._options = dict(ext_hook=self._decode_ext, strict_map_key=False,
                             unicode_errors="surrogatepass")

    def decode(self, frame: bytes | bytearray) -> object:
        """The object encoded in `frame`. Raises FrameError (a ValueError) if the frame is
        not one an Encoder makes; a frame corrupted only inside its data decodes to the
        changed data."""
        frame_len = len(frame)
        if frame_len < _HEADER.size:
            raise FrameError(
                f"frame of {frame_len} bytes is too short: a frame has at least {_HEADER.size}"
            )
        (meta_len,) = _HEADER.unpack_from(frame)
        meta_end = _HEADER.size + meta_len
        meta = memoryview(frame)[_HEADER.size : meta_end]
        self._frame_len, self._cursor = frame_len, meta_end
        if meta_end == frame_len:  # no out-of-band buffers: the common small message
            return self._unpack(meta, meta_end)
        if meta_end > frame_len:
            raise FrameError(
                f"frame of {frame_len} bytes is truncated: "
                f"its header announces {meta_len} bytes of msgpack"
            )
        self._frame = frame
        try:
            obj = self._unpack(meta, meta_end)
        finally:
            self._frame = None
        if self._cursor != frame_len:
            extra = frame_len - self._cursor
            raise FrameError(f"frame of {frame_len} bytes has {extra} bytes past its last buffer")
        return obj

    def _unpack(self, meta: memoryview, meta_end: int) -> object:
        try:
            try:
                return msgpack.unpackb(meta, **self._options)
            except TypeError:
                # A tuple key arrives as an unhashable list: decode again, with keys as
                # tuples (only on this rare path, as a pairs hook costs a Python call per
                # dict). Any other unhashable key is corruption, refused below.
                self._cursor = meta_end
                return msgpack.unpackb(meta, object_pairs_hook=_dict_with_tuple_keys,
                                       **self._options)
        except FrameError:
            raise
        except (ValueError, TypeError, RecursionError, msgpack.UnpackException) as exc:
            # msgpack's own errors (bad type bytes, missing or extra data, too deep nesting,
            # invalid UTF-8) and keys no dict can hold (an array, a map, nested past Python's
            # recursion limit): none is in a frame an Encoder makes.
            raise FrameError(
                f"frame of {self._frame_len} bytes: its msgpack part (bytes {_HEADER.size} to "
                f"{meta_end}) is malformed: {type(exc).__name__}: {exc}"
            ) from None

    def _decode_ext(self, code: int, data: bytes) -> object:
        if code == EXT_NDARRAY:
            dtype_str, shape, nbytes = ext_fields(code, data, (str, list, int))
            return self._array(code, shape, numpy_dtype(dtype_str), nbytes)
        if code == EXT_TENSOR:
            import torch

            name, shape, nbytes = ext_fields(code, data, (str, list, int))
            dtype, carrier = _tensor_dtype(name)
            if not nbytes:
                check_layout(code, shape, carrier.itemsize, nbytes)
                with _quiet_dtype_warnings():
                    return torch.empty(shape, dtype=dtype)
            tensor = torch.from_numpy(self._array(code, shape, carrier, nbytes))
            return tensor if tensor.dtype == dtype else tensor.view(dtype)
        if code == EXT_NUMPY_SCALAR:
            dtype_str, raw = ext_fields(code, data, (str, bytes))
            dtype = numpy_dtype(dtype_str)
            check_scalar_bytes(dtype, raw)
            return np.frombuffer(raw, dtype)[0]
        raise FrameError(f"unknown msgpack extension code {code}: this decoder knows codes 1 to 3")

    def _array(self, code: int, shape: list[int], dtype: np.dtype, nbytes: int) -> np.ndarray:
        check_layout(code, shape, dtype.itemsize, nbytes)
        if not nbytes:
            return np.empty(shape, dtype)
        offset = self._cursor + (-self._cursor % _ALIGN)
        end = offset + nbytes
        if end > self._frame_len:
            raise FrameError(
                f"frame of {self._frame_len} bytes is truncated: "
                f"a buffer needs bytes {offset} to {end}"
            )
        array = np.ndarray(shape, dtype, self._frame, offset)
        self._cursor = end
        return array


@contextlib.contextmanager
def _quiet_dtype_warnings() -> Iterator[None]:
    """Around the tensors the codec itself makes (a probe, a contiguous copy, an empty
    result): torch warns on making one of complex32 (experimental) or a quantized dtype
    (deprecated), a warning about the caller's choice of dtype that the codec's copies
    should not repeat in the caller's process."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


@functools.cache
def _tensor_codec(dtype: torch.dtype) -> tuple[str, torch.dtype | None]:
    """The wire name of a torch dtype, and the same-size int dtype to view it as when numpy
    has no equivalent (bfloat16, float8)."""
    import torch

    name = str(dtype).removeprefix("torch.")
    try:
        with _quiet_dtype_warnings():
            torch.empty(0, dtype=dtype).numpy()
    except TypeError:
        same_size_int = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
        return name, same_size_int[dtype.itemsize]
    return name, None


@functools.cache
def _tensor_dtype(name: str) -> tuple[torch.dtype, np.dtype]:
    """The torch dtype of a wire name, and the numpy dtype that carries its bytes."""
    import torch

    # vars, not getattr: torch's module __getattr__ would import a submodule by its name
    dtype = vars(torch).get(name)
    if not isinstance(dtype, torch.dtype):
        raise FrameError(f"unknown torch dtype {name!r} in frame")
    _, carrier = _tensor_codec(dtype)
    return dtype, torch.empty(0, dtype=carrier or dtype).numpy().dtype


@functools.cache
def _numpy_dtype_name(dtype: np.dtype) -> str:
    """The wire name of a numpy dtype: `dtype.str`, which keeps byte order and units."""
    if dtype.kind not in NUMPY_KINDS or dtype.fields is not None:
        raise TypeError(
            f"cannot serialize a numpy array or scalar of dtype {dtype}: supported dtype kinds "
            "are bool, integer, float, complex, datetime, timedelta, bytes and str"
        )
    return dtype.str


def _dict_with_tuple_keys(pairs: list[tuple[object, object]]) -> dict:
    return {_as_tuple(key): value for key, value in pairs}


def _as_tuple(key: object) -> object:
    return tuple(map(_as_tuple, key)) if isinstance(key, list) else key


def _type_name(obj: object) -> str:
    cls = type(obj)
    if cls.__module__ == "builtins":
        return cls.__qualname__
    return f"{cls.__module__}.{cls.__qualname__}"
