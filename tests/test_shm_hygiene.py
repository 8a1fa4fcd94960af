"""Segment hygiene of the shared-memory rings: names, permissions, the unlink once every
reader is in, and the sweep of what writers killed before that left in /dev/shm."""

from __future__ import annotations

import glob
import mmap
import os
import random
import signal
import stat
import time
from collections.abc import Iterator
from contextlib import contextmanager
from multiprocessing.process import BaseProcess

from launcher import SPAWN, join_all, spawn
from shm_helpers import (TIMEOUT, create_and_exit, create_rings_until_killed, expect_event,
                         idle_writer, shm_path)

from shardline._shm import Ring, sweep_orphans

# Byte ranges in SegmentHeader (csrc/layout.hpp).
MAGIC = slice(0, 8)
VERSION = slice(8, 12)
WRITER_PID = slice(48, 52)
WRITER_PID_NAMESPACE = slice(64, 72)
NOBODY = 65534


@contextmanager
def mapped_header(name: str) -> Iterator[mmap.mmap]:
    with open(shm_path(name), "r+b") as segment, mmap.mmap(segment.fileno(), 4096) as header:
        yield header


@contextmanager
def unattached_writer() -> Iterator[tuple[BaseProcess, str]]:
    """A writer process blocked in wait_attached on a ring nobody attaches to. On exit it
    is killed and its segment removed, whatever state the test left them in."""
    events = SPAWN.Queue()
    writer = spawn(idle_writer, events)
    name = ""
    try:
        name = expect_event(events, "name")
        yield writer, name
    finally:
        writer.kill()
        writer.join(TIMEOUT)
        if name and os.path.exists(shm_path(name)):
            os.unlink(shm_path(name))


def kill_keeping_the_segment(writer: BaseProcess, name: str) -> bytes:
    """SIGKILLs the writer with its magic zeroed, so that no sweep in another process
    takes the segment before the test looked at it; returns the magic to put back."""
    with mapped_header(name) as header:
        magic = header[MAGIC]
        header[MAGIC] = bytes(8)
    os.kill(writer.pid, signal.SIGKILL)
    writer.join(TIMEOUT)
    assert not writer.is_alive()
    assert os.path.exists(shm_path(name)), "the killed writer's segment should be left behind"
    return magic


def test_segment_is_private_and_unlinked_once_all_readers_attached():
    with Ring.create(2, 4, 64) as writer:
        path = shm_path(writer.name)
        assert writer.name.startswith("/shardline-") and len(writer.name) == len("/shardline-") + 32
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        with Ring.attach(writer.name, 0):
            assert os.path.exists(path)
            with Ring.attach(writer.name, 1):
                writer.wait_attached(timeout=1)
                assert not os.path.exists(path)


def test_no_segment_left_after_close_drop_or_normal_exit_of_the_creator():
    with Ring.create(2, 4, 64) as closed:
        Ring.attach(closed.name, 0)
    assert not os.path.exists(shm_path(closed.name))

    dropped = Ring.create(2, 4, 64)
    name = dropped.name
    del dropped
    assert not os.path.exists(shm_path(name))

    events = SPAWN.Queue()
    child = spawn(create_and_exit, events)
    name = expect_event(events, "name")
    join_all([child], TIMEOUT)
    assert not os.path.exists(shm_path(name))
    assert shm_path(name) not in glob.glob("/dev/shm/shardline-*")


def test_names_are_random():
    rings = [Ring.create(1, 1, 1) for _ in range(8)]
    assert len({ring.name for ring in rings}) == 8
    for ring in rings:
        ring.close()


def test_segment_of_a_writer_killed_before_its_reader_attached_goes_at_the_next_create():
    with unattached_writer() as (writer, name):
        magic = kill_keeping_the_segment(writer, name)
        with mapped_header(name) as header:
            header[MAGIC] = magic
        with Ring.create(1, 4, 64):
            assert not os.path.exists(shm_path(name))


def test_sweep_removes_only_complete_rings_of_dead_writers_of_this_user():
    foreign = [shm_path("/shardline-test-" + os.urandom(8).hex()) for _ in range(2)]
    try:
        with open(foreign[0], "wb") as garbage:
            garbage.write(os.urandom(1 << 16))
        with open(foreign[1], "wb") as being_created:
            being_created.write(bytes(1 << 16))
        with unattached_writer() as (writer, name), Ring.create(1, 4, 64) as own:
            removed = sweep_orphans()
            assert name not in removed and own.name not in removed
            for path in (shm_path(name), shm_path(own.name), *foreign):
                assert os.path.exists(path)

            magic = kill_keeping_the_segment(writer, name)
            assert name not in sweep_orphans(), "a segment without a valid magic was removed"
            with mapped_header(name) as header:
                other_build, other_namespace = (99).to_bytes(4, "little"), os.urandom(8)
                for field, value in [(VERSION, other_build), (WRITER_PID_NAMESPACE, other_namespace)]:
                    saved = header[field]
                    header[field] = value
                    header[MAGIC] = magic
                    kept = name not in sweep_orphans()
                    header[MAGIC] = bytes(8)
                    header[field] = saved
                    assert kept, f"a segment with header bytes {field} changed was removed"

                # Another user's segment: root opens anything, so the owner changes too.
                os.chmod(shm_path(name), 0)
                if os.geteuid() == 0:
                    os.chown(shm_path(name), NOBODY, NOBODY)
                header[MAGIC] = magic
                kept = name not in sweep_orphans()
                header[MAGIC] = bytes(8)
                if os.geteuid() == 0:
                    os.chown(shm_path(name), os.geteuid(), os.getegid())
                os.chmod(shm_path(name), 0o600)
                assert kept, "another user's segment, or one that cannot be opened, was removed"

                header[MAGIC] = magic
            assert name in sweep_orphans()
            assert not os.path.exists(shm_path(name))
    finally:
        for path in foreign:
            os.unlink(path)


def _headers(paths: set[str]) -> dict[str, bytes]:
    """The first 64 bytes of each segment still there (other runs remove theirs)."""
    found = {}
    for path in paths:
        try:
            with open(path, "rb") as segment:
                found[path] = segment.read(64)
        except FileNotFoundError:
            pass
    return found


def test_a_writer_killed_while_it_creates_leaves_no_partly_written_segment():
    """A segment's name used to exist from the start of a create, before its sizing and
    header: a writer killed in between left a segment with no magic, which no sweep may
    take (nothing tells it from one being written), in /dev/shm for good (seen after a
    serve stopped by SIGTERM while its workers started). Now the name appears only once
    the header is complete: writers killed at random moments of back-to-back creates
    leave only complete segments, and the sweep removes them."""
    rng = random.Random()
    before = set(glob.glob("/dev/shm/shardline-*"))
    killed = set()
    try:
        for _ in range(12):
            events = SPAWN.Queue()
            writer = spawn(create_rings_until_killed, events)
            killed.add(expect_event(events, "creating"))
            time.sleep(rng.uniform(0.0, 0.02))
            os.kill(writer.pid, signal.SIGKILL)
            writer.join(TIMEOUT)
            for path, header in _headers(set(glob.glob("/dev/shm/shardline-*")) - before).items():
                assert header[MAGIC] != bytes(8), f"{path} was left without its header"
        sweep_orphans()
        left = _headers(set(glob.glob("/dev/shm/shardline-*")) - before)
        assert not [path for path, header in left.items()
                    if int.from_bytes(header[WRITER_PID], "little") in killed]
    finally:
        for path, header in _headers(set(glob.glob("/dev/shm/shardline-*")) - before).items():
            if header[MAGIC] == bytes(8) and (
                    int.from_bytes(header[WRITER_PID], "little") in killed or not any(header)):
                os.unlink(path)
