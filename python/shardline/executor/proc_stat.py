"""What /proc/<pid>/stat says of a process: the executors' view of their workers' states
(stopped_workers) and of whether a process that made something is still the one alive
under its pid (rendezvous)."""

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
