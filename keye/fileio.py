"""Files written whole or not at all.

Every writer goes to a hidden temporary sibling (``.name.tmpPID``) and renames it onto the target, so a
job killed mid-write leaves the old file or the new one, never a torn mix, and two processes writing the
same name never share a temporary. Folders (checkpoints, saved models) follow the same rule in their
own code: written as ``name.tmp/`` and renamed.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write; it replaces ``path`` when the block ends and is
    removed if the block raises. ``fsync`` flushes it to disk before the rename (for shards that readers
    pick up while the job still runs)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only still there when the block failed


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
