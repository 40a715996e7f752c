"""Edges a new user meets on the command line: one-line errors for folders and URLs before any model
loads, stdout that holds only the answer, ``VisionInputs`` indexed like the peers' tuple."""

import json
import subprocess
import sys

import pytest
import torch

from keye.cli import main
from keye.video import process_vision_info
from keye.video.synthetic import write_cut_clip


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("edges") / "clip.mp4"
    write_cut_clip(path, num_frames=8, height=56, width=56, cuts=(4,))
    return path


def test_a_folder_or_a_url_is_named_as_such(tmp_path, capsys):
    folder = tmp_path / "videos.mp4"
    folder.mkdir()
    assert main(["video-info", str(folder)]) == 2
    assert "is a folder, not a video file" in capsys.readouterr().err
    # keye ask refuses both before loading the model (the model named here does not even exist)
    assert main(["ask", str(folder), "Why?", "--model", str(tmp_path / "no-model")]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["ask", "https://example.org/a.mp4", "Why?", "--model", str(tmp_path / "no-model")]) == 2
    assert "remote URLs are not fetched" in capsys.readouterr().err


def test_video_end_past_the_end_is_said(clip, caplog):
    with caplog.at_level("WARNING", logger="keye.video.reader"):
        images, videos = process_vision_info([{"role": "user", "content": [
            {"type": "video", "video": str(clip), "video_start": 1.0, "video_end": 60.0}]}], slow_fast=False)
    assert len(videos[0]) >= 2
    assert any("video_end=60.0 is past the end" in r.getMessage() for r in caplog.records)


def test_vision_inputs_index_like_the_peers_tuple(clip):
    vision = process_vision_info([{"role": "user", "content": [{"type": "video", "video": str(clip)}]}])
    images, videos = vision
    assert len(vision) == 2 and vision[0] is images is vision.images and vision[1] is videos is vision.videos
    assert vision[-1] is videos and vision[:1] == (images,)


def test_keye_ask_json_stdout_is_only_the_json(clip, tmp_path):
    """Run as a user runs it: a fresh process, whose library imports (DeepSpeed through transformers, when
    installed) must not print into stdout."""
    from keye.models import build_model
    from keye.processing import load_nano_processor

    torch.manual_seed(0)
    build_model("keye-nano").save_pretrained(tmp_path / "ckpt")
    load_nano_processor().save_pretrained(tmp_path / "ckpt")
    result = subprocess.run([sys.executable, "-m", "keye", "ask", str(clip), "What moves?", "--model",
                             str(tmp_path / "ckpt"), "--json", "--max-new-tokens", "2", "--device", "cpu",
                             "--max-pixels", "3136"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    answer = json.loads(result.stdout)  # the whole stdout is the JSON answer
    assert set(answer) == {"answer", "thinking", "mode", "raw"}
