"""The command line as one package: ``python -m keye`` runs it, building every parser loads no model code,
and the video flags are generated from ``VideoOptions`` (one spelling per option, shared by every command)."""

import argparse
import dataclasses
import subprocess
import sys

import pytest

from keye.cli import build_parser
from keye.cli.options import add_video_flags, video_options_from
from keye.errors import VideoError
from keye.video import VideoOptions


def test_python_dash_m_keye_runs_the_command():
    result = subprocess.run([sys.executable, "-m", "keye", "--help"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    for command in ("ask", "video-info", "train", "eval", "world", "items", "demo"):
        assert command in result.stdout


def test_building_every_parser_imports_no_torch():
    script = "import sys; from keye.cli import build_parser; build_parser(); print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_video_info_loads_no_transformers(tmp_path):
    from keye.video.synthetic import write_cut_clip

    write_cut_clip(tmp_path / "clip.mp4", num_frames=8, height=56, width=56, cuts=(4,))
    script = (f"import sys; from keye.cli import main; code = main(['video-info', {str(tmp_path / 'clip.mp4')!r}]); "
              "print('transformers' in sys.modules, code)")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.stdout.strip().splitlines()[-1] == "False 0", result.stdout + result.stderr


def _video_parser():
    parser = argparse.ArgumentParser()
    add_video_flags(parser)
    return parser


def test_every_video_option_has_one_flag_with_the_fields_type():
    flags = {a.dest: a for a in _video_parser()._actions if a.option_strings}
    fields = {f.name for f in dataclasses.fields(VideoOptions)}
    assert fields <= set(flags)
    for f in dataclasses.fields(VideoOptions):
        assert flags[f.name].option_strings[0] == "--" + f.name.replace("_", "-")
        assert flags[f.name].help  # every flag says what it does
    args = _video_parser().parse_args(["--fps", "1", "--max-frames", "4", "--video-end", "3.5", "--no-slow-fast"])
    assert video_options_from(args) == VideoOptions(fps=1.0, max_frames=4, video_end=3.5, slow_fast=False)
    assert isinstance(video_options_from(args).max_frames, int)


def test_video_flags_set_only_what_was_given_over_a_base():
    base = VideoOptions(fps=2.0, max_pixels=12544, slow_fast=False)
    args = _video_parser().parse_args(["--max-frames", "8"])
    assert video_options_from(args, base) == VideoOptions(fps=2.0, max_pixels=12544, max_frames=8, slow_fast=False)
    with pytest.raises(VideoError, match="video flags: fps must be > 0"):
        video_options_from(_video_parser().parse_args(["--fps", "-2"]))
    with pytest.raises(VideoError, match="give fps or nframes, not both"):
        video_options_from(_video_parser().parse_args(["--nframes", "3"]), base)


def test_message_keys_and_their_aliases_read_into_the_same_options():
    part = {"type": "video", "video": "a.mp4", "video_total_pixels": 784000, "sample_fps": 1.0, "raw_fps": 30}
    assert VideoOptions.from_message(part, "part") == VideoOptions(total_pixels=784000, fps=1.0)
    with pytest.raises(VideoError, match=r"part: unknown message key\(s\) 'max_frame'.*known keys: .*max_frames"):
        VideoOptions.from_message({"video": "a.mp4", "max_frame": 3}, "part")
    with pytest.raises(VideoError, match="disagree"):
        VideoOptions.from_message({"total_pixels": 1000 * 784, "video_total_pixels": 2000 * 784}, "part")


def test_pipeline_keyword_options_are_checked_before_any_decoding():
    from keye.api import build_messages

    with pytest.raises(VideoError, match="'max_frame'"):
        build_messages("missing.mp4", "Why?", max_frame=4)  # the file is never opened
    with pytest.raises(VideoError, match="max_frames must be > 0"):
        build_messages("missing.mp4", "Why?", max_frames=0)
    assert build_parser()  # and the whole command line builds
