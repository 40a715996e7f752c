"""Equivalence with the peers on the same clips: keye-vl-utils 1.5.2 (Slow-Fast) and qwen-vl-utils 0.0.14 (uniform).

Compared: frame indices (via timestamps for keye-vl-utils, which returns no indices), frame types,
timestamps, slow/fast sizes, and pixels: the peers' full path to model-ready frames includes the
resize (keye-vl-utils leaves it to the HF processor, which resizes full-resolution frames with PIL
bicubic; qwen-vl-utils resizes with torchvision bicubic in float).
"""

from __future__ import annotations

import keye_vl_utils.vision_process as keye_ref
import numpy as np
import pytest
import qwen_vl_utils.vision_process as qwen_ref
import torch
from PIL import Image

from keye.video import read_image, read_video
from keye.video.types import SLOW

CLIPS = ["bikes", "bigbuckbunny", "carphone", "cut_clip", "cut_clip_25fps", "tall_clip", "gradient_clip"]


def _path(request, fixture):
    value = request.getfixturevalue(fixture)
    return str(value[0] if isinstance(value, tuple) else value)


def _keye_sizes(kwargs):
    return (kwargs["height"], kwargs["width"]), (kwargs["fast_height"], kwargs["fast_width"])


def _assert_matches_keye(ours, frames_ref, kwargs, max_mean_diff=0.05):
    slow_ref, fast_ref = _keye_sizes(kwargs)
    assert torch.equal(ours.frame_types, kwargs["frame_types"])
    assert torch.equal(ours.timestamps, kwargs["timestamps"])  # same indices, same float32 arithmetic
    assert ours.slow_size == slow_ref
    assert ours.fast_size == (fast_ref if bool((kwargs["frame_types"] != SLOW).any()) else None)
    for frame, ref, kind in zip(ours.frames, frames_ref, kwargs["frame_types"].tolist()):
        h, w = slow_ref if kind == SLOW else fast_ref
        processor = np.asarray(Image.fromarray(ref.permute(1, 2, 0).numpy()).resize((w, h), Image.BICUBIC))
        diff = np.abs(frame.permute(1, 2, 0).numpy().astype(np.int16) - processor)
        # torch's uint8 bicubic is a port of Pillow's: near-identical; a few levels at most on hard edges
        assert diff.mean() < max_mean_diff and (diff > 1).mean() < 1e-3 and diff.max() <= 8


@pytest.mark.parametrize("fixture", CLIPS)
def test_slow_fast_matches_keye_vl_utils(request, fixture):
    path = _path(request, fixture)
    frames_ref, kwargs = keye_ref.fetch_video({"video": path})
    _assert_matches_keye(read_video(path), frames_ref, kwargs)


@pytest.mark.parametrize("options", [{"fps": 1.0}, {"max_frames": 6}, {"fps": 4.0, "min_frame_similarity": 0.8},
                                     {"max_pixels": 200 * 784}, {"min_pixels": 64 * 784}])
def test_slow_fast_options_match_keye_vl_utils(bikes, options):
    frames_ref, kwargs = keye_ref.fetch_video({"video": bikes, **options})
    _assert_matches_keye(read_video(bikes, **options), frames_ref, kwargs)


def test_bytes_and_frame_lists_match_keye_vl_utils(cut_clip, bikes):
    data = open(bikes, "rb").read()
    frames_ref, kwargs = keye_ref.fetch_video({"video": data})
    _assert_matches_keye(read_video(data), frames_ref, kwargs)

    frames = [Image.fromarray(f) for f in cut_clip[1].frames_THWC]
    frames_ref, kwargs = keye_ref.fetch_video({"video": frames, "fps": 2.0})
    _assert_matches_keye(read_video(frames, fps=2.0), frames_ref, kwargs)


def test_budget_fix_on_a_real_clip(cut_clip):
    """Where keye-vl-utils overshoots video_total_pixels we stay within it; elsewhere we agree.
    (24 frames of 320x240, 4 slow: the reference's search lands on 1356 tokens for budgets 1352-1355.)"""
    path = str(cut_clip[0])
    overshoots = 0
    for tokens in (1340, 1352, 1356):
        frames_ref, kwargs = keye_ref.fetch_video({"video": path, "video_total_pixels": tokens * 784})
        slow_ref, fast_ref = _keye_sizes(kwargs)
        num_slow = int((kwargs["frame_types"] == SLOW).sum())
        num_fast = len(frames_ref) - num_slow
        ref_total = (num_slow * slow_ref[0] * slow_ref[1] + num_fast * fast_ref[0] * fast_ref[1]) // 784
        ours = read_video(path, video_total_pixels=tokens * 784)
        assert torch.equal(ours.frame_types, kwargs["frame_types"])
        assert ours.num_tokens <= tokens
        if ref_total > tokens:
            overshoots += 1
            assert ours.slow_size[0] * ours.slow_size[1] < slow_ref[0] * slow_ref[1]
        else:
            assert (ours.slow_size, ours.fast_size) == (slow_ref, fast_ref)
    assert overshoots == 1


def _qwen(ele):
    video, meta = qwen_ref.fetch_video(ele, return_video_metadata=True)
    return video, meta


def _assert_matches_qwen(ours, video_ref, indices_ref):
    assert ours.indices.tolist() == list(indices_ref)
    assert ours.slow_size == tuple(video_ref.shape[-2:])
    assert bool((ours.frame_types == SLOW).all()) and ours.fast_size is None
    stacked = torch.stack(ours.frames).float()
    diff = (stacked - video_ref).abs()
    # torch's native uint8 bicubic vs torchvision's float bicubic + round: off by a level or so,
    # more only at clamped overshoots next to hard edges
    assert diff.mean() < 0.3 and (diff > 2).float().mean() < 2e-3 and diff.max() <= 16


@pytest.mark.parametrize("fixture", CLIPS)
def test_uniform_matches_qwen_vl_utils(request, fixture):
    path = _path(request, fixture)
    video_ref, meta = _qwen({"video": path})
    ours = read_video(path, slow_fast=False)
    _assert_matches_qwen(ours, video_ref, meta["frames_indices"])
    assert torch.allclose(ours.timestamps, torch.tensor(meta["frames_indices"]) / meta["fps"])


@pytest.mark.parametrize("options", [{"nframes": 6}, {"fps": 0.5, "min_frames": 2}, {"fps": 3.0, "max_frames": 10},
                                     {"video_start": 1.5, "video_end": 7.2}, {"total_pixels": 2000 * 784},
                                     {"max_pixels": 200 * 784}, {"resized_height": 200, "resized_width": 300}])
def test_uniform_options_match_qwen_vl_utils(bikes, options):
    video_ref, meta = _qwen({"video": bikes, **options})
    _assert_matches_qwen(read_video(bikes, slow_fast=False, **options), video_ref, meta["frames_indices"])


def test_uniform_frame_list_matches_qwen_vl_utils(cut_clip):
    frames = [Image.fromarray(f) for f in cut_clip[1].frames_THWC[:7]]
    video_ref, meta = _qwen({"video": frames})
    _assert_matches_qwen(read_video(frames, slow_fast=False), video_ref, [0, 1, 2, 3, 4, 5, 6, 6])


@pytest.mark.parametrize("options", [{}, {"max_pixels": 50 * 784}, {"min_pixels": 2000 * 784},
                                     {"resized_height": 100, "resized_width": 90}])
def test_images_equal_both_peers(tmp_path, options):
    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (123, 257, 3), dtype=np.uint8)
    path = tmp_path / "img.png"
    Image.fromarray(pixels).save(path)
    ours = read_image(str(path), **options).pixels.permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(ours, np.asarray(qwen_ref.fetch_image({"image": str(path), **options})))
    np.testing.assert_array_equal(ours, np.asarray(keye_ref.fetch_image({"image": str(path), **options})))
