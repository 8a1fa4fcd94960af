"""Corrupt frames: every one the decoder is given either decodes to some value or raises
FrameError, saying what is wrong and where; none crashes, hangs or allocates what its
declared sizes ask for."""

import struct
import subprocess
import sys

import msgpack
import numpy as np
import pytest
import torch
from shm_helpers import MAX_MESSAGE_BYTES, MESSAGE_BYTES, message_bytes_offset, ring_with_segment
from wire_values import as_received, random_value

from shardline._shm import RingCorrupted
from shardline.ipc import FrameError, MessageQueue
from shardline.ipc.serializer import Decoder, Encoder
from shardline.step import (CachedRequestData, CachedRequests, ModelRunnerOutput,
                            NewRequestData, SchedulerOutput, TokenLogprobs)


def frame_of(obj: object) -> bytes:
    parts = Encoder().encode(obj)
    return b"".join(p.tobytes() if isinstance(p, np.ndarray) else bytes(p) for p in parts)


def step_call(rng) -> list:
    """A broadcast [call_id, method, args, kwargs, reply_rank] of one engine step."""
    new = [NewRequestData(f"new-{i}", [rng.randrange(32000) for _ in range(rng.randint(1, 40))],
                          [], {"temperature": rng.random(), "seed": rng.randrange(2**32)},
                          list(range(rng.randint(1, 6))), 0) for i in range(rng.randint(0, 3))]
    cached = [CachedRequestData(f"old-{i}", [rng.randrange(32000)], [rng.randrange(500)],
                                rng.randrange(4000)) for i in range(rng.randint(0, 6))]
    req_ids = [n.req_id for n in new] + [c.req_id for c in cached]
    step = SchedulerOutput(new_requests=new, cached_requests=CachedRequests.of(cached),
                           num_scheduled_tokens={r: rng.randint(1, 40) for r in req_ids},
                           finished_req_ids=[f"done-{i}" for i in range(rng.randint(0, 2))])
    return [rng.randrange(1, 10**6), "execute_model", [step.to_dict()], {}, rng.choice([-1, 0, 3])]


def step_reply(rng) -> list:
    """A worker's [call_id, ok, payload] answer to a step."""
    n = rng.randint(0, 8)
    logprobs = [TokenLogprobs(-rng.random(), [rng.randrange(32000)] * 2, [-rng.random()] * 2)
                if rng.random() < 0.5 else None for _ in range(n)]
    out = ModelRunnerOutput([f"r{i}" for i in range(n)], [rng.randrange(32000) for _ in range(n)],
                            logprobs)
    return [rng.randrange(1, 10**6), True, out.to_dict()]


def array_reply(rng) -> list:
    """A collective_rpc reply carrying a numpy array and a tensor (out-of-band buffers)."""
    array = np.frombuffer(rng.randbytes(8 * rng.randint(1, 50)), "<f8")
    tensor = torch.randn(rng.randint(1, 5), rng.randint(1, 9)).to(
        rng.choice([torch.float32, torch.bfloat16, torch.int64]))
    return [rng.randrange(1, 10**6), True, {"weights": tensor, "counts": array}]


def mutate(rng, frame: bytes) -> bytearray:
    """`frame` with bytes flipped (mostly in the msgpack part, where the structure is),
    cut short, extended, or with bytes inserted."""
    frame = bytearray(frame)
    (meta_len,) = struct.unpack_from("<I", frame)
    kind = rng.randrange(4)
    if kind == 0:
        for _ in range(rng.randint(1, 3)):
            in_meta = meta_len and rng.random() < 0.9
            at = rng.randrange(4, 4 + meta_len) if in_meta else rng.randrange(len(frame))
            frame[at] = rng.choice([rng.randrange(256), 0x00, 0xff, 0xc1, 0xc7, 0xd4, 0xdc, 0xde])
    elif kind == 1:
        del frame[rng.randrange(len(frame)):]
    elif kind == 2:
        frame += rng.randbytes(rng.randint(1, 80))
    else:
        at = rng.randrange(len(frame))
        frame[at:at] = rng.randbytes(rng.randint(1, 8))
    return frame


def test_mutated_frames_decode_or_raise_frame_error(rng):
    makers = [step_call, step_reply, array_reply, random_value]
    frames = [frame_of(rng.choice(makers)(rng)) for _ in range(100)]
    decoder = Decoder()
    refused = 0
    for _ in range(20000):
        frame = mutate(rng, rng.choice(frames))
        try:
            decoder.decode(frame)
        except FrameError:
            refused += 1
        except Exception as exc:
            pytest.fail(f"{type(exc).__name__} ({exc}) escaped the decoder for frame "
                        f"{bytes(frame[:300])!r}")
    assert refused, "no mutation was refused: the mutations do not reach the structure"


def frame_with_ext(code: int, header: object, buffer: bytes = b"", raw_header: bytes | None = None
                   ) -> bytearray:
    """A frame whose msgpack part is one extension value, then `buffer` at the alignment."""
    payload = msgpack.packb(header) if raw_header is None else raw_header
    meta = msgpack.packb(msgpack.ExtType(code, payload))
    padding = bytes(-(4 + len(meta)) % 64) if buffer else b""
    return bytearray(struct.pack("<I", len(meta)) + meta + padding + buffer)


def test_huge_declared_sizes_are_refused_before_anything_is_allocated(rng, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"allocated {args}")

    # The decoder learns each dtype's carrier once per process, from an empty tensor:
    # that is learnt here first, so the test does not depend on what earlier tests decoded.
    for dtype in (torch.float32, torch.bfloat16):
        Decoder().decode(bytearray(frame_of(torch.zeros(0, dtype=dtype))))
    monkeypatch.setattr(np, "empty", refuse)
    monkeypatch.setattr(torch, "empty", refuse)
    big = rng.randint(2**36, 2**62)
    for code, dtype in [(1, "<f4"), (2, "float32"), (2, "bfloat16")]:
        for shape, nbytes in [([big], 0), ([0, big, big], 0), ([big], 4 * big),
                              ([1] * 65, 4), ([2, -3], 0)]:
            with pytest.raises(FrameError, match="declares shape|truncated"):
                Decoder().decode(frame_with_ext(code, [dtype, shape, nbytes], bytes(64)))


@pytest.mark.parametrize("code, header, buffer, message", [
    (1, ["|O", [1], 8], bytes(8), "not one the encoder sends"),
    (1, ["i4,i4", [1], 8], bytes(8), "not one the encoder sends"),
    (1, ["<M8[bogus]", [1], 8], bytes(8), "unknown numpy dtype"),
    (1, ["<f8", [2], 8], bytes(8), "declares shape"),
    (1, ["<f8", "ab", 8], bytes(8), r"not \[str, list, int\]"),
    (1, ["<f8", [1]], bytes(8), r"not \[str, list, int\]"),
    (1, 7, bytes(8), r"not \[str, list, int\]"),
    (2, ["_dynamo", [1], 8], bytes(8), "unknown torch dtype"),
    (2, [b"float32", [1], 4], bytes(4), r"not \[str, list, int\]"),
    (3, ["<i8", b"\x01\x02"], b"", "has 2 bytes, not 8"),
    (3, ["<U1", b"\xff\xff\xff\xff"], b"", "past U\\+10FFFF"),
    (3, ["<U0", b""], b"", "has 0 bytes"),
    (4, ["<f8", [1], 8], b"", "unknown msgpack extension code 4"),
])
def test_a_corrupt_array_header_names_what_is_wrong(code, header, buffer, message):
    with pytest.raises(FrameError, match=message):
        Decoder().decode(frame_with_ext(code, header, buffer))


def test_tensors_round_trip_without_torch_warnings_from_the_codec(rng):
    """The codec probes whether numpy takes a dtype with an empty tensor of it; for
    complex32 and the quantized dtypes that probe made torch warn in the caller's process
    (complex32 is experimental, quantized tensors are deprecated), as did the contiguous
    copy of a strided complex32 tensor and an empty one decoded. torch warns once per
    process, so the check runs in a fresh one."""
    script = f"""
import random, torch
from shardline.ipc.serializer import Decoder, Encoder
rng = random.Random({rng.randrange(2**32)})
def round_trip(tensor):
    frame = bytearray(b"".join(bytes(part) for part in Encoder().encode(tensor)))
    return Decoder().decode(frame)
# First, before anything else makes a complex32 tensor (torch warns once per process):
# a strided one, which encoding copies contiguous.
rows = rng.randint(2, 5)
raw = torch.tensor(list(rng.randbytes(4 * rows * 3)), dtype=torch.uint8)
strided = raw.view(torch.complex32).view(rows, 3).t()
assert torch.equal(round_trip(strided).view(torch.int32), strided.contiguous().view(torch.int32))
for dtype in (torch.complex32, torch.quint8, torch.qint32):
    raw = torch.tensor(list(rng.randbytes(4 * rng.randint(1, 9))), dtype=torch.uint8)
    decoded = round_trip(raw.view(dtype))
    assert decoded.dtype == dtype and torch.equal(decoded.view(torch.uint8), raw), dtype
    assert round_trip(raw[:0].view(dtype)).dtype == dtype
"""
    done = subprocess.run([sys.executable, "-W", "error", "-c", script],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("raw_header", [b"", b"\xc1", b"\x93\xa3<f8", b"\x92\x01\x02\x03"])
def test_an_array_header_that_is_not_msgpack_raises_frame_error(raw_header):
    with pytest.raises(FrameError, match="header of a numpy array"):
        Decoder().decode(frame_with_ext(1, None, raw_header=raw_header))


@pytest.mark.parametrize("meta, what", [
    (b"\xc1", "FormatError"),  # a byte msgpack never uses
    (b"\x92\x01", "ValueError"),  # an array of 2 holding 1 item
    (b"\x91" * 3000 + b"\xc0", "StackError"),
    (b"\x81\x93\x01\x02\x81\x01\x02\x03", "TypeError"),  # a key holding a map
    (b"\x81" + b"\x91" * 990 + b"\x01\xc0", "RecursionError"),  # a tuple key nested deep
    (b"\xa2\xff\xfe", "UnicodeDecodeError"),
])
def test_malformed_msgpack_raises_frame_error_naming_the_bytes(meta, what):
    frame = bytearray(struct.pack("<I", len(meta)) + meta)
    with pytest.raises(FrameError, match=f"msgpack part \\(bytes 4 to {4 + len(meta)}\\) is "
                                         f"malformed: {what}"):
        Decoder().decode(frame)


def test_frame_error_is_a_value_error_and_the_decoder_goes_on(rng):
    value = step_reply(rng)
    decoder = Decoder()
    with pytest.raises(ValueError):
        decoder.decode(bytearray(b"\x05\x00\x00\x00\xc1"))
    assert decoder.decode(bytearray(frame_of(value))) == as_received(value)


def test_a_corrupt_frame_on_a_queue_raises_frame_error_and_the_next_message_arrives(rng):
    value = step_call(rng)
    corrupt = bytearray(frame_of(value))
    corrupt[4] = 0xc1  # the msgpack part starts with a byte msgpack never uses
    with MessageQueue.create(1) as writer, MessageQueue.attach(writer.handle(), 0) as reader:
        writer.wait_attached(5)
        writer._ring.write_parts([bytes(corrupt)], 5)
        writer.enqueue(value, 5)
        with pytest.raises(FrameError, match="malformed: FormatError"):
            reader.dequeue(5)
        assert reader.dequeue(5) == as_received(value)


def test_a_corrupted_ring_raises_frame_error_naming_it(rng):
    """A slot header no writer wrote (here a message size past the ring's limit) makes the
    ring raise RingCorrupted, a RuntimeError the executors did not expect from a queue:
    the queue raises it as FrameError, which they turn into a dead engine naming the ring."""
    writer, reader, mapping = ring_with_segment(4, 4096)
    try:
        # Small enough to fit the ring whole: nothing reads while it is written.
        MessageQueue(writer).enqueue([rng.randrange(2**31), "execute_model", None], 5)
        claimed = rng.randrange(MAX_MESSAGE_BYTES + 1, 2**64)
        MESSAGE_BYTES.pack_into(mapping, message_bytes_offset(mapping, 0), claimed)
        with pytest.raises(FrameError, match=rf"ring '{writer.name}' is corrupted: .* "
                                             rf"announces {claimed} bytes") as caught:
            MessageQueue(reader).dequeue(5)
        assert isinstance(caught.value.__cause__, RingCorrupted)
    finally:
        reader.close()
        writer.close()
        mapping.close()
