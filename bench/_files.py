"""Result files written whole or not at all.

The GPU check kills a stage at its time limit, and several scripts rewrite their JSON after
every case so that a stage cut off still leaves what it measured; a kill in the middle of
such a rewrite must leave the previous, complete file rather than a truncated one."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def write_json(path: Path, data: object, indent: int | None = 2) -> None:
    """Replace `path` with `data` as JSON in one rename, so a reader (or a kill) never sees
    half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data, indent=indent) + "\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
