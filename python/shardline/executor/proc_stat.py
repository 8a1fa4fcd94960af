"""What /proc/<pid>/stat says of a process: the executors' view of their workers' states
(stopped_workers) and of whether a process seen earlier is still the one alive under its
pid (rendezvous, the Ray node agent's signals)."""

from __future__ import annotations


def stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name, from the state on (index 0 is
    the state letter, 19 the start time in clock ticks since boot); None once it is gone.
    The command name is skipped by its closing parenthesis: it may hold spaces and ')'."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            text = stat.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


ENDED_STATES = "ZXx"  # the states of a process that has ended (a zombie has)


def start_time(pid: int) -> str | None:
    """Process `pid`'s start time, which a later process reusing the pid does not share;
    None once it is gone."""
    fields = stat_fields(pid)
    return None if fields is None else fields[19]


def still_running(pid: int, started: str) -> bool:
    """Whether the process that had start time `started` under `pid` has not ended."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] not in ENDED_STATES and fields[19] == started
