"""Argument checking of the shared-memory rings of shardline._shm: bad geometry, reader
indexes, names, foreign segments, timeouts and reader pids are refused with an error that
names the argument."""

from __future__ import annotations

import mmap
import os

import pytest
from shm_helpers import shm_path

from shardline._shm import Ring


@pytest.mark.parametrize(
    ("args", "argument"),
    [
        ((0, 4, 64), "n_readers"),
        ((65, 4, 64), "n_readers"),
        ((-1, 4, 64), "n_readers"),
        ((1, 0, 64), "n_slots"),
        ((1, 2**40, 64), "n_slots"),
        ((1, 4, 0), "slot_size"),
        ((1, 4, 2**27), "slot_size"),
        ((1, 2**20, 2**26), "n_slots \\* slot_size"),
    ],
)
def test_create_rejects_bad_geometry(args, argument):
    with pytest.raises(ValueError, match=f"^{argument} must be"):
        Ring.create(*args)


def test_attach_rejects_bad_reader_index_and_names():
    with Ring.create(2, 4, 64) as writer:
        for index in (-1, 2, 64):
            with pytest.raises(ValueError, match=r"reader_index must be in \[0, 1\]"):
                Ring.attach(writer.name, index)
        with Ring.attach(writer.name, 0):
            with pytest.raises(ValueError, match="reader_index 0 .* already attached"):
                Ring.attach(writer.name, 0)
    with pytest.raises(FileNotFoundError, match="name"):
        Ring.attach("/shardline-" + os.urandom(16).hex(), 0)
    with pytest.raises(ValueError, match="name must look like"):
        Ring.attach("no-slash", 0)


def test_attach_rejects_foreign_segments():
    name = "/shardline-test-" + os.urandom(8).hex()
    try:
        with open(shm_path(name), "wb") as segment:
            segment.write(b"\0" * 16)
        with pytest.raises(ValueError, match="name: .* not a shardline ring"):
            Ring.attach(name, 0)
        with open(shm_path(name), "wb") as segment:
            segment.write(os.urandom(1 << 16))
        with pytest.raises(ValueError, match="name: .* has magic"):
            Ring.attach(name, 0)
    finally:
        os.unlink(shm_path(name))

    with Ring.create(2, 4, 64) as writer:
        with open(shm_path(writer.name), "r+b") as segment, mmap.mmap(segment.fileno(), 0) as header:
            header[8:12] = (99).to_bytes(4, "little")
        with pytest.raises(ValueError, match="name: .* version 99"):
            Ring.attach(writer.name, 0)


def test_bad_timeout_is_rejected():
    with Ring.create(1, 4, 64) as writer, Ring.attach(writer.name, 0) as reader:
        with pytest.raises(ValueError, match="timeout must be None or"):
            reader.read(timeout=-1)
        with pytest.raises(ValueError, match="timeout must be None or"):
            writer.write(b"x", timeout=float("nan"))


@pytest.mark.parametrize(
    ("reader_pids", "error", "message"),
    [
        ("12", TypeError, r"reader_pids must be None or a list of process ids \(ints\), got str"),
        (12, TypeError, r"reader_pids must be None or a list of process ids \(ints\), got int"),
        ([1.0], TypeError, r"reader_pids\[0\] must be an int process id, got float 1.0"),
        ([1, True], TypeError, r"reader_pids\[1\] must be an int process id, got bool True"),
        ([0], ValueError, r"reader_pids\[0\] must be in \[1, 2147483647\], got 0"),
        ([1, -3], ValueError, r"reader_pids\[1\] must be in \[1, 2147483647\], got -3"),
        ([2**31], ValueError, r"reader_pids\[0\] must be in \[1, 2147483647\], got 2147483648"),
        ([2**70], ValueError, rf"reader_pids\[0\] must be in \[1, 2147483647\], got {2**70}$"),
        ([7, 7], ValueError, r"reader_pids lists pid 7 twice \(at 0 and 1\)"),
        ([1, 2, 3], ValueError, r"reader_pids lists 3 processes but ring .* has only 2 readers"),
    ],
)
def test_wait_attached_rejects_bad_reader_pids(reader_pids, error, message):
    with Ring.create(2, 4, 64) as writer:
        with pytest.raises(error, match=message):
            writer.wait_attached(timeout=0, reader_pids=reader_pids)
