"""Atomic file writes: the target holds the old bytes or the new ones, never a mix or nothing."""

from __future__ import annotations

import pytest

from keye.fileio import atomic_path, atomic_write_text


def test_write_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "report.json"
    atomic_write_text(path, "old")
    atomic_write_text(path, "new ü")
    assert path.read_text(encoding="utf-8") == "new ü"
    assert [p.name for p in path.parent.iterdir()] == ["report.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "table.parquet"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["table.parquet"]


def test_fsync_path_writes_through(tmp_path):
    with atomic_path(tmp_path / "shard", fsync=True) as tmp:
        tmp.write_bytes(b"\x00\x01")
    assert (tmp_path / "shard").read_bytes() == b"\x00\x01"
