"""The class a rank runs, named by `ParallelConfig.worker_cls` (a dotted path), so that a
tool (a benchmark of the executor alone, a test) can run its own worker in every rank."""

from __future__ import annotations

import importlib


def import_worker_class(path: str) -> type:
    """The class at `path` ("package.module.Class"); ValueError naming what is missing."""
    module_name, _, class_name = path.rpartition(".")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"worker_cls={path!r}: cannot import {module_name!r} ({exc})") from None
    try:
        return getattr(module, class_name)
    except AttributeError:
        raise ValueError(f"worker_cls={path!r}: module {module_name!r} has no "
                         f"{class_name!r}") from None
