"""``keye video-info`` through the real CLI entry point."""

from __future__ import annotations

import re

from keye.cli import main


def _rows(output: str) -> list[list[str]]:
    return [line.split() for line in output.splitlines() if re.match(r"^\s+\d+\s+\d+\s+[\d.]+\s+(slow|fast)\s", line)]


def test_video_info_prints_the_plan(cut_clip, capsys):
    path, clip = cut_clip
    assert main(["video-info", str(path)]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert len(rows) == 24
    assert [int(r[1]) for r in rows if r[3] == "slow"] == clip.scene_starts
    assert rows[5][2] == "2.50" and rows[5][4] == "252x308" and rows[5][5] == "99"
    total = sum(int(r[5]) for r in rows)
    assert f"total {total} tokens of a 65536-token budget" in out
    assert "24 frames (4 slow, 20 fast)" in out


def test_video_info_options(bikes, capsys):
    assert main(["video-info", bikes, "--no-slow-fast", "--nframes", "6", "--backend", "pyav"]) == 0
    out = capsys.readouterr().out
    rows = _rows(out)
    assert [int(r[1]) for r in rows] == [0, 50, 100, 149, 199, 249]
    assert all(r[3] == "slow" for r in rows) and "uniform" in out and "pyav" in out


def test_video_info_reports_bad_input(tmp_path, capsys):
    assert main(["video-info", str(tmp_path / "gone.mp4")]) == 2
    err = capsys.readouterr().err
    assert "gone.mp4" in err and "file not found" in err
    assert main(["video-info", str(tmp_path / "gone.mp4"), "--fps", "1", "--nframes", "3"]) == 2
    assert "not both" in capsys.readouterr().err
