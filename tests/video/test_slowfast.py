"""Slow-Fast selection: OpenCV-exact HSV, cut frames found exactly, same decisions as keye-vl-utils."""

from __future__ import annotations

import cv2
import keye_vl_utils.vision_process as keye_ref
import numpy as np
import torch

from keye.video.slowfast import SlowFastSelector, rgb_to_hsv_opencv, select_slow_fast
from keye.video.synthetic import make_cut_clip
from keye.video.types import SLOW


def _frames_TCHW(frames_THWC: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(frames_THWC).permute(0, 3, 1, 2)


def test_hsv_is_bit_exact_with_opencv_on_every_colour():
    codes = np.arange(2**24, dtype=np.uint32)
    rgb_HW3 = np.stack([(codes >> 16) & 255, (codes >> 8) & 255, codes & 255], -1)
    rgb_HW3 = rgb_HW3.astype(np.uint8).reshape(4096, 4096, 3)
    ours = rgb_to_hsv_opencv(torch.from_numpy(rgb_HW3).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(ours, cv2.cvtColor(rgb_HW3, cv2.COLOR_RGB2HSV))
    assert ours[..., 0].max() == 179


def test_slow_frames_are_exactly_the_cuts():
    for seed, cuts in [(0, (5, 11, 18)), (1, (1, 2, 3)), (2, (23,)), (3, ())]:
        clip = make_cut_clip(num_frames=24, height=120, width=200, cuts=cuts, seed=seed)
        types = select_slow_fast(_frames_TCHW(clip.frames_THWC))
        assert torch.nonzero(types == SLOW).flatten().tolist() == clip.scene_starts


def test_streaming_in_chunks_equals_one_pass():
    clip = make_cut_clip(num_frames=30, height=96, width=160, cuts=(4, 9, 10, 22), seed=5)
    frames = _frames_TCHW(clip.frames_THWC)
    one_pass = select_slow_fast(frames, chunk=len(frames))
    selector = SlowFastSelector()
    chunked = torch.cat([selector.update(frames[i:i + 7]) for i in range(0, len(frames), 7)])
    assert torch.equal(one_pass, chunked)


def test_matches_keye_vl_utils_on_hard_cases():
    """Random noise, black frames (all-black patch pairs excluded, an all-black pair of frames
    stays fast), partial changes around the 0.9 threshold, and a custom threshold."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (64, 112, 3), dtype=np.uint8)
    frames = [base]
    for t in range(1, 40):
        frame = frames[-1].copy()
        if t % 9 == 0:
            frame[:] = 0  # black frame
        elif t % 9 == 1:
            frame = rng.integers(0, 256, (64, 112, 3), dtype=np.uint8)
        else:  # change a growing strip: similarity walks down through 0.9
            frame[:, : 4 * (t % 9)] = rng.integers(0, 256, (64, 4 * (t % 9), 3), dtype=np.uint8)
        frames.append(frame)
    frames_TCHW = _frames_TCHW(np.stack(frames))
    for threshold in (0.9, 0.5, 0.97):
        expected = keye_ref.extract_slow_fast_frames(frames_TCHW, threshold)
        assert torch.equal(select_slow_fast(frames_TCHW, threshold, chunk=8), expected), threshold
        assert 2 < int((expected == SLOW).sum()) < len(frames) - 2  # the case is not degenerate
