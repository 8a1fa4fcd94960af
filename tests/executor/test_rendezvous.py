"""FileRendezvous: a directory whose maker is gone (killed with everything it started, so
nobody removed it) is removed when the next one is made; one whose maker lives, or that
names no maker, is kept."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile

import pytest

from shardline.executor import rendezvous
from shardline.executor.rendezvous import OWNER_FILE, FileRendezvous

MAKE_AND_WAIT = ("import sys, time\n"
                 "from shardline.executor.rendezvous import FileRendezvous\n"
                 "print(FileRendezvous().directory, flush=True)\n"
                 "time.sleep(600)\n")


@pytest.fixture
def temp_root(tmp_path, monkeypatch):
    """A temporary directory of the test's own, for this process and its children."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    return tmp_path


def made_by_child(temp_root) -> tuple[subprocess.Popen, str]:
    child = subprocess.Popen([sys.executable, "-c", MAKE_AND_WAIT], stdout=subprocess.PIPE,
                             text=True, env=dict(os.environ, TMPDIR=str(temp_root)))
    directory = child.stdout.readline().strip()
    assert os.path.isdir(directory), directory
    return child, directory


def test_a_killed_makers_directory_goes_and_a_live_ones_stays(temp_root):
    killed, abandoned = made_by_child(temp_root)
    alive, kept = made_by_child(temp_root)
    try:
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        assert os.path.isdir(abandoned)
        own = FileRendezvous()
        assert not os.path.exists(abandoned)
        assert os.path.isdir(kept) and os.path.isdir(own.directory)
        own.release()
        assert not os.path.exists(own.directory)
    finally:
        alive.kill()
        alive.wait(timeout=30)
        killed.stdout.close()
        alive.stdout.close()


def test_a_reused_pid_does_not_keep_a_directory(temp_root, rng):
    """The maker's pid now names another process (here: this one, started at another
    time than the record says): the directory is abandoned all the same."""
    directory = tempfile.mkdtemp(prefix=rendezvous.PREFIX)
    namespace, pid, started = rendezvous._owner_record().split()
    wrong_start = int(started) + rng.randint(1, 10**6)
    with open(os.path.join(directory, OWNER_FILE), "w") as record:
        record.write(f"{namespace} {pid} {wrong_start}\n")
    assert rendezvous.sweep_abandoned() == [directory]
    assert not os.path.exists(directory)


@pytest.mark.parametrize("record", [None, "", "not a record", "1 2", "x y z"])
def test_a_directory_naming_no_maker_is_kept(temp_root, record):
    directory = tempfile.mkdtemp(prefix=rendezvous.PREFIX)
    if record is not None:
        with open(os.path.join(directory, OWNER_FILE), "w") as owner:
            owner.write(record)
    assert rendezvous.sweep_abandoned() == []
    assert os.path.isdir(directory)


def test_another_namespaces_directory_is_kept(temp_root):
    """A pid of another pid namespace (a container sharing this temporary directory)
    says nothing about this one's processes."""
    directory = tempfile.mkdtemp(prefix=rendezvous.PREFIX)
    namespace, _, _ = rendezvous._owner_record().split()
    with open(os.path.join(directory, OWNER_FILE), "w") as record:
        record.write(f"{int(namespace) + 1} 999999999 1\n")
    assert rendezvous.sweep_abandoned() == []
    assert os.path.isdir(directory)
