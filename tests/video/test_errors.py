"""Every bad input raises the toolkit's VideoError (a ValueError) naming the input and the problem."""

from __future__ import annotations

import pytest

from keye.errors import KeyeInputError, VideoError
from keye.video import process_vision_info, read_video


def _raises(match: str, *args, **kwargs):
    with pytest.raises(VideoError, match=match) as info:
        read_video(*args, **kwargs)
    assert isinstance(info.value, (KeyeInputError, ValueError))
    return str(info.value)


@pytest.mark.parametrize("backend", ["auto", "decord", "pyav"])
def test_missing_path(backend, tmp_path):
    message = _raises("file not found", str(tmp_path / "absent.mp4"), backend=backend)
    assert "absent.mp4" in message


@pytest.mark.parametrize("backend", ["auto", "decord", "pyav"])
def test_unreadable_file(backend, tmp_path):
    path = tmp_path / "notes.mp4"
    path.write_text("this is not a video\n" * 50)
    assert "notes.mp4" in _raises("cannot open", str(path), backend=backend)


@pytest.mark.parametrize("backend", ["auto", "decord", "pyav"])
def test_truncated_file(backend, truncated_clip):
    assert "truncated.mp4" in _raises("cannot open|truncated|corrupt", str(truncated_clip), backend=backend)


def test_truncated_bytes(cut_clip):
    data = cut_clip[0].read_bytes()
    _raises("bytes.*(cannot open|truncated|corrupt)", data[: len(data) // 3])


@pytest.mark.parametrize("backend", ["auto", "pyav"])
def test_no_video_stream(backend, audio_only):
    assert "tone.wav" in _raises("no video stream|cannot open", str(audio_only), backend=backend)


def test_zero_frames_after_trimming(cut_clip):
    path = cut_clip[0]
    _raises("zero frames after trimming", path, video_start=30.0)  # the clip is 12 s long
    _raises("zero frames after trimming", path, video_start=5.0, video_end=5.2)


def test_start_not_before_end(cut_clip):
    _raises("video_start=4.0 must be before video_end=3.0", cut_clip[0], video_start=4.0, video_end=3.0)
    _raises("video_start=3 must be before video_end=3", cut_clip[0], video_start=3, video_end=3)


def test_fps_and_nframes_together(cut_clip):
    _raises("fps or nframes, not both", cut_clip[0], fps=1.0, nframes=4)


@pytest.mark.parametrize("options,match", [
    ({"min_pixels": 500_000, "max_pixels": 100_000}, "min_pixels=500000 is larger than max_pixels=100000"),
    ({"max_pixels": -5}, "max_pixels must be > 0"),
    ({"video_total_pixels": 0}, "total_pixels must be > 0"),
    ({"video_total_pixels": 20 * 784}, "too small for a single frame"),
    ({"fps": 0}, "fps must be > 0"),
    ({"fps": float("nan")}, "fps must be a number"),
    ({"nframes": 0}, "nframes must be > 0"),
    ({"nframes": 2.5}, "nframes must be an integer"),
    ({"nframes": 500}, "nframes=500 is more than the 24 frames"),
    ({"max_frames": 0}, "max_frames must be > 0"),
    ({"min_frames": 9, "max_frames": 4}, "min_frames=9 is larger than max_frames=4"),
    ({"min_frame_similarity": 1.5}, "min_frame_similarity must be in"),
    ({"video_start": -1}, "video_start must be >= 0"),
    ({"resized_height": 100}, "resized_height and resized_width together"),
    ({"total_pixels": 1000 * 784, "video_total_pixels": 2000 * 784}, "disagree"),
])
def test_options_out_of_range(cut_clip, options, match):
    assert "cuts.mp4" in _raises(match, cut_clip[0], **options)


def test_uniform_frame_count_and_pixels_out_of_range(cut_clip):
    _raises("nframes=40 is more than", cut_clip[0], slow_fast=False, nframes=40)
    _raises("max_pixels=78400 is below min_pixels=100352", cut_clip[0], slow_fast=False, max_pixels=100 * 784)


def test_unknown_message_key_is_named(cut_clip):
    message = _raises("unknown message key.*'max_frame'", cut_clip[0], max_frame=4)
    assert "max_frames" in message  # the list of known keys helps spot the typo
    with pytest.raises(VideoError, match="image #1.*unknown message key.*'resize'"):
        process_vision_info([{"role": "user", "content": [{"type": "image", "image": "x.png", "resize": 2}]}])


def test_unknown_backend(cut_clip):
    _raises("unknown backend 'ffmpeg'", cut_clip[0], backend="ffmpeg")


def test_remote_urls_are_refused():
    _raises("remote URLs are not fetched", "https://example.invalid/clip.mp4")


def test_bad_frame_list(tmp_path):
    import numpy as np
    from PIL import Image

    Image.fromarray(np.zeros((56, 56, 3), np.uint8)).save(tmp_path / "a.png")
    with pytest.raises(VideoError, match="frame list of 2 frame 1 .*b.png.*file not found"):
        read_video([str(tmp_path / "a.png"), str(tmp_path / "b.png")])
    with pytest.raises(VideoError, match="empty"):
        read_video([])

    with pytest.raises(VideoError, match="must be uint8"):
        read_video([np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(VideoError, match="share a size"):
        read_video([np.zeros((64, 64, 3), np.uint8), np.zeros((640, 64, 3), np.uint8)], max_pixels=10**7)


def test_bad_video_in_a_batch_names_which_one(cut_clip, tmp_path):
    good = str(cut_clip[0])
    bad = str(tmp_path / "missing.mp4")
    conversations = [
        [{"role": "user", "content": [{"type": "video", "video": good}]}],
        [{"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "video", "video": good},
                                      {"type": "video", "video": bad}]}],
    ]
    with pytest.raises(VideoError) as info:
        process_vision_info(conversations)
    message = str(info.value)
    assert message.startswith("video #3 (conversation 1 message 0 part 2, ") and "missing.mp4" in message
    assert "file not found" in message
