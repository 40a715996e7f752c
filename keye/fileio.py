"""Files written whole or not at all, and folders one run writes at a time.

Every writer goes to a hidden temporary sibling (``.name.tmpPID``) and renames it onto the target, so a
job killed mid-write leaves the old file or the new one, never a torn mix, and two processes writing the
same name never share a temporary. Folders (checkpoints, saved models, shipped starts) follow the same
rule through ``atomic_folder``: written as ``.name.tmp/`` and renamed. ``run_lock`` keeps a second run out of a folder a run is
writing.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from keye.errors import KeyeInputError

LOCK = ".lock"


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


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path`` to fill; when the block ends it takes the place of
    ``path`` (a folder already there is removed), and if the block raises it is removed instead. ``path``
    never holds a half-written folder."""
    path = Path(path)
    tmp, old = path.with_name(f".{path.name}.tmp"), path.with_name(f".{path.name}.old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex), read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


@contextmanager
def run_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold ``folder``'s run lock for the block: a second run into the same folder stops at once with a
    ``KeyeInputError`` naming the holder (pid, host, since when).

    The lock is an advisory ``flock`` on ``folder/.lock``, which the kernel releases when its holder exits,
    however it exits: a lock left by a dead process is simply taken over. The file holds the holder's
    pid, host and start time for the message. Under torchrun only rank 0 takes it (the ranks of one job
    write one folder together)."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    path = Path(folder) / LOCK
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise KeyeInputError(f"{folder}: another run is writing here ({_holder(path)}); wait for it, stop "
                                 "it, or give this run another folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}).encode())
        try:
            yield
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _holder(path: Path) -> str:
    try:
        info = json.loads(path.read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']} on {info['host']}, since {since}"
    except (OSError, ValueError, KeyError):
        return "its holder is starting"
