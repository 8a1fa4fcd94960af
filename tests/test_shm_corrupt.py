"""A ring whose slot header is corrupted in shared memory: the size a message's first slot
announces sizes the reader's buffer, so a corrupt one is refused, naming the ring, before
anything is allocated for it; a writer refuses a message past the documented limit."""

from __future__ import annotations

import mmap
import os
import struct

import pytest
from shm_helpers import shm_path

from shardline._shm import Ring

MAX_MESSAGE_BYTES = 4 << 30  # csrc/layout.hpp kMaxMessageBytes
# SegmentHeader: magic u64, version u32, n_readers u32, n_slots u64, slot_size u64,
# slot_stride u64, segment_bytes u64 (csrc/layout.hpp); SlotHeader: seq u64,
# message_bytes u64, bytes u32, flags u32.
GEOMETRY = struct.Struct("<16xQQQQ")
MESSAGE_BYTES = struct.Struct("<Q")


def ring_with_segment(n_slots: int, slot_size: int) -> tuple[Ring, Ring, mmap.mmap]:
    """A writer, its one reader, and a mapping of their segment (made before the reader
    attaches, as the last attacher unlinks the name)."""
    writer = Ring.create(1, n_slots, slot_size)
    with open(shm_path(writer.name), "r+b") as segment:
        mapping = mmap.mmap(segment.fileno(), 0)
    reader = Ring.attach(writer.name, 0)
    writer.wait_attached(5.0)
    return writer, reader, mapping


def message_bytes_offset(mapping: mmap.mmap, seq: int) -> int:
    """Where in the segment the slot of sequence `seq` keeps its message's size."""
    n_slots, _, stride, segment_bytes = GEOMETRY.unpack_from(mapping)
    return segment_bytes - n_slots * stride + (seq % n_slots) * stride + 8


@pytest.mark.parametrize("n_slots, slot_size", [(4, 64), (8, 4096)])
def test_a_corrupt_message_size_is_refused_before_anything_is_allocated(rng, n_slots,
                                                                          slot_size):
    writer, reader, mapping = ring_with_segment(n_slots, slot_size)
    try:
        # A message of one slot or several, at a sequence number maybe past the first lap
        seq = rng.randrange(3 * n_slots)
        for _ in range(seq):
            writer.write(b"x")
            assert reader.read(1.0) == b"x"
        writer.write(os.urandom(rng.randrange(1, 3 * slot_size)))
        claimed = rng.choice([rng.randrange(MAX_MESSAGE_BYTES + 1, 2**64),
                              rng.randrange(2**48, 2**64)])
        MESSAGE_BYTES.pack_into(mapping, message_bytes_offset(mapping, seq), claimed)
        with pytest.raises(RuntimeError, match=rf"ring '{writer.name}' is corrupted: the first "
                                               rf"slot of the message at sequence {seq} "
                                               rf"announces {claimed} bytes"):
            reader.read(1.0)
    finally:
        reader.close()
        writer.close()
        mapping.close()


def test_a_size_within_the_limit_that_its_first_slot_belies_is_refused(rng):
    """A message of one slot whose size now claims more slots: the first slot's flags
    and payload disagree, so the claim is refused before the buffer is allocated."""
    slot_size = rng.choice([64, 4096])
    writer, reader, mapping = ring_with_segment(4, slot_size)
    try:
        writer.write(os.urandom(rng.randrange(slot_size + 1)))
        claimed = rng.randrange(slot_size + 1, MAX_MESSAGE_BYTES + 1)
        MESSAGE_BYTES.pack_into(mapping, message_bytes_offset(mapping, 0), claimed)
        with pytest.raises(RuntimeError, match=rf"is corrupted: the first slot of the message "
                                               rf"at sequence 0 announces {claimed} bytes"):
            reader.read(1.0)
    finally:
        reader.close()
        writer.close()
        mapping.close()


def test_a_writer_refuses_a_message_past_the_limit():
    """The parts repeat one small buffer, so the check is reached without the memory."""
    piece = memoryview(bytes(1 << 20))
    parts = [piece] * (MAX_MESSAGE_BYTES // len(piece) + 1)
    with Ring.create(1, 4, 64) as writer, Ring.attach(writer.name, 0) as reader:
        writer.wait_attached(5.0)
        with pytest.raises(ValueError, match=rf"a message of {MAX_MESSAGE_BYTES + len(piece)} "
                                             rf"bytes is larger than a ring carries \(at most "
                                             rf"{MAX_MESSAGE_BYTES} bytes\)"):
            writer.write_parts(parts, timeout=1.0)
        writer.write(b"next")
        assert reader.read(1.0) == b"next"
