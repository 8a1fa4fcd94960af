"""A ring whose slot header is corrupted in shared memory: the size a message's first slot
announces sizes the reader's buffer, so a corrupt one is refused, naming the ring, before
anything is allocated for it; a writer refuses a message past the documented limit."""

from __future__ import annotations

import os

import pytest
from shm_helpers import (MAX_MESSAGE_BYTES, MESSAGE_BYTES, message_bytes_offset,
                         ring_with_segment)

from shardline._shm import Ring, RingCorrupted


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
        with pytest.raises(RingCorrupted, match=rf"ring '{writer.name}' is corrupted: the first "
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
        with pytest.raises(RingCorrupted, match=rf"is corrupted: the first slot of the message "
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
