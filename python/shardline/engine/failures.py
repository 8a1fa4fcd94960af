"""How LLM and AsyncLLM tell a caller that their engine can run no more: EngineDeadError,
which a serving stack catches to build a new engine, never a ValueError, which means a bad
request of the caller's own."""

from __future__ import annotations

import os

from shardline.executor.base import EngineDeadError


def engine_dead(error: Exception) -> EngineDeadError:
    """The EngineDeadError of an engine that `error` stopped (a step or an add that failed
    other than as a bad request), with `error` as its cause; an EngineDeadError as it is.
    A failed step's own ValueError or IndexError must not read as a bad request."""
    if isinstance(error, EngineDeadError):
        return error
    dead = EngineDeadError(f"the engine failed ({type(error).__name__}: {error}) and runs no "
                           "more: build a new one")
    dead.__cause__ = error
    return dead


def in_forked_child(owner: str, built_by: int) -> EngineDeadError | None:
    """The EngineDeadError for a use of `owner` (an LLM or AsyncLLM built by process
    `built_by`) from another process, a fork of that one; None in `built_by` itself.

    A forked child holds a copy of the engine's state, but its workers are the parent's:
    steps sent from the child would run on them beside the parent's own, and a shutdown
    would stop them under the parent. An in-process engine would hang in the child
    instead: libgomp, torch's CPU thread pool, does not survive a fork."""
    pid = os.getpid()
    if pid == built_by:
        return None
    return EngineDeadError(f"this {owner} was built by process {built_by}, and process {pid} "
                           f"is a fork of it, which cannot run it: the engine and its workers "
                           f"serve the parent. Build a new {owner} in this process")
