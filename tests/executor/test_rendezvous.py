"""FileRendezvous: a directory whose maker is gone (killed with everything it started, so
nobody removed it) is removed when the next one is made; one whose maker lives, or that
names no maker, is kept."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest

from shardline.executor import proc_stat, rendezvous
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


def test_a_killed_maker_not_yet_waited_for_is_gone(temp_root):
    """A maker killed under a parent that has not reaped it (a supervisor, a launcher
    without wait) is a zombie: its pid and start time are still in /proc, and its
    directory was kept for as long as the parent lived."""
    zombie, abandoned = made_by_child(temp_root)
    try:
        zombie.send_signal(signal.SIGKILL)
        deadline = time.monotonic() + 30
        while proc_stat.stat_fields(zombie.pid)[0] != "Z":
            assert time.monotonic() < deadline, "the child did not end"
            time.sleep(0.01)
        assert rendezvous.sweep_abandoned() == [abandoned]
        assert not os.path.exists(abandoned)
    finally:
        zombie.wait(timeout=30)
        zombie.stdout.close()


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


def test_a_maker_that_proc_does_not_show_leaves_no_record(temp_root, rng):
    """/proc showing another pid namespace than the maker's (`unshare --pid` without
    --mount-proc): its own pid names no process there, or another one. Recorded anyway,
    the directory of a live maker was swept as abandoned by the next engine."""
    not_its_pid = rng.randint(2**22, 2**31 - 1)  # past the kernel's largest pid_max
    script = f"import os\nos.getpid = lambda: {not_its_pid}\n" + MAKE_AND_WAIT
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                             env=dict(os.environ, TMPDIR=str(temp_root)))
    try:
        directory = child.stdout.readline().strip()
        assert os.path.isdir(directory), directory
        assert not os.path.exists(os.path.join(directory, OWNER_FILE))
        assert rendezvous.sweep_abandoned() == []
        assert os.path.isdir(directory)
    finally:
        child.kill()
        child.wait(timeout=30)
        child.stdout.close()


def test_a_rendezvous_is_made_without_proc(temp_root):
    """A sandbox with no /proc mounted (here: a tmpfs over it, in a mount namespace of the
    test's own) starts engines as before the sweep existed: their directories name no
    maker. It failed with FileNotFoundError on /proc/self/ns/pid."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("hiding /proc needs unshare as root")
    script = ("from shardline.executor.rendezvous import FileRendezvous, sweep_abandoned\n"
              "import os\n"
              "assert sweep_abandoned() == []\n"
              "own = FileRendezvous()\n"
              "print(sorted(os.listdir(own.directory)))\n"
              "own.release()\n"
              "print(os.path.exists(own.directory))\n")
    hidden = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c",
         f'mount -t tmpfs none /proc && exec "{sys.executable}" -c "$0"', script],
        capture_output=True, text=True, timeout=120,
        env=dict(os.environ, TMPDIR=str(temp_root)))
    assert hidden.returncode == 0, hidden.stderr
    assert hidden.stdout.split("\n")[:2] == ["[]", "False"]
