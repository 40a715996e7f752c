"""Frame-count and size arithmetic against the peers (keye-vl-utils 1.5.2, qwen-vl-utils 0.0.14)."""

from __future__ import annotations

import itertools

import keye_vl_utils.vision_process as keye_ref
import pytest
import qwen_vl_utils.vision_process as qwen_ref

from keye.errors import VideoError
from keye.video import sizing

SHAPES = [(272, 640), (1080, 1920), (1920, 1080), (240, 320), (32, 48), (100, 3000), (719, 1283), (28, 28), (5000, 60)]


@pytest.mark.parametrize("min_pixels,max_pixels", [(3136, 16384 * 784), (48 * 784, 768 * 784), (48 * 784, 256 * 784),
                                                   (128 * 784, 300 * 784)])
def test_smart_resize_matches_both_peers(min_pixels, max_pixels):
    for h, w in SHAPES + [(h, w) for h in range(20, 900, 97) for w in range(20, 900, 89)]:
        ours = sizing.smart_resize(h, w, 28, min_pixels, max_pixels)
        assert ours == keye_ref.smart_resize(h, w, 28, min_pixels, max_pixels), (h, w)
        assert ours == qwen_ref.smart_resize(h, w, 28, min_pixels, max_pixels), (h, w)


def test_smart_resize_rejects_extreme_aspect_ratio():
    with pytest.raises(VideoError, match="aspect ratio"):
        sizing.smart_resize(10, 2500)


@pytest.mark.parametrize("total,fps", [(250, 25.0), (1, 30.0), (17999, 29.97), (40, 2.0), (3000, 60.0), (9, 0.5)])
@pytest.mark.parametrize("options", [{}, {"fps": 1.0}, {"fps": 4.0, "max_frames": 30},
                                     {"video_total_pixels": 1000 * 784},
                                     {"min_pixels": 100 * 784}, {"fps": 100.0}])
def test_keye_nframes_matches_keye_vl_utils(total, fps, options):
    ours = sizing.keye_nframes(total, fps, fps=options.get("fps"), max_frames=options.get("max_frames"),
                               min_pixels=options.get("min_pixels"), total_pixels=options.get("video_total_pixels"))
    assert ours == keye_ref.smart_nframes(options, total_frames=total, video_fps=fps)


@pytest.mark.parametrize("total,fps", [(250, 25.0), (17999, 29.97), (40, 2.0), (3000, 60.0), (8, 2.0)])
@pytest.mark.parametrize("options", [{}, {"fps": 1.0}, {"nframes": 6}, {"fps": 4.0, "min_frames": 8, "max_frames": 30}])
def test_qwen_nframes_matches_qwen_vl_utils(total, fps, options):
    try:
        expected = qwen_ref.smart_nframes(options, total_frames=total, video_fps=fps)
    except ValueError:
        with pytest.raises(VideoError):
            sizing.qwen_nframes(total, fps, **options)
        return
    assert sizing.qwen_nframes(total, fps, **options) == expected


def _keye_reference_sizes(height, width, num_slow, num_fast, total_pixels):
    """keye-vl-utils 1.5.2's budget search and resize, lifted from fetch_video (no decoding)."""
    min_pixels, min_tokens = 48 * 784, 48
    left, right = 48.0, 768.0

    def estimate(t):
        return num_slow * t * 784 + num_fast * max(int(0.3 * t), min_tokens) * 784

    while left < right:
        mid = int(left + right) // 2
        if estimate(mid) > total_pixels:
            right = mid
        else:
            left = mid + 1
    slow = keye_ref.smart_resize(height, width, 28, min_pixels, left * 784)
    fast_max = max(int(slow[0] * slow[1] / 784 * 0.3) * 784, 48 * 784)
    return slow, keye_ref.smart_resize(height, width, 28, min_pixels, fast_max)


@pytest.mark.parametrize("height,width", SHAPES[:-3] + [(360, 640), (1280, 720)])
def test_budget_equals_reference_when_it_does_not_bind(height, width):
    for num_slow, num_fast in [(1, 0), (5, 15), (20, 0), (40, 40)]:
        plan = sizing.slow_fast_budget(height, width, num_slow, num_fast)
        ref_slow, ref_fast = _keye_reference_sizes(height, width, num_slow, num_fast, sizing.VIDEO_TOTAL_PIXELS)
        assert (plan.slow_size, plan.fast_size) == (ref_slow, ref_fast)


@pytest.mark.parametrize("height,width", [(1080, 1920), (1920, 1080), (360, 640), (272, 640), (32, 48), (2000, 200),
                                          (1080, 1080)])
def test_budget_never_exceeds_and_keeps_fast_floor(height, width):
    overshoots = 0
    for num_slow, num_fast in itertools.product([1, 7, 60, 200, 386, 456, 600, 715, 1300], [0, 10, 30, 400, 500, 1000]):
        if num_slow + num_fast > 1365:
            continue
        if (num_slow + num_fast) * sizing.min_frame_tokens(height, width) > 65536:
            # tiny sources cost over 48 tokens even at the floor; read_video caps the frame count for them
            with pytest.raises(VideoError, match="budget"):
                sizing.slow_fast_budget(height, width, num_slow, num_fast)
            continue
        plan = sizing.slow_fast_budget(height, width, num_slow, num_fast)
        assert plan.total_tokens <= 65536, (num_slow, num_fast, plan)
        # the fast frame is sized with the reference's floor: max(int(0.3 * slow tokens), 48) tokens
        fast_max = max(int(plan.slow_tokens * 0.3), 48) * 784
        assert plan.fast_size == sizing.smart_resize(height, width, 28, 48 * 784, fast_max)
        ref_slow, ref_fast = _keye_reference_sizes(height, width, num_slow, num_fast, sizing.VIDEO_TOTAL_PIXELS)
        ref_total = num_slow * sizing.tokens(ref_slow) + num_fast * sizing.tokens(ref_fast)
        if ref_total > 65536:  # the reference overshoots: we step down, and only as far as needed
            overshoots += 1
            assert plan.slow_tokens < sizing.tokens(ref_slow)
            # ... to the sizes of the largest t below the reference's that fits (brute force)
            for t in range(sizing.tokens(ref_slow), 47, -1):
                slow, fast = sizing._slow_fast_sizes(height, width, 48 * 784, t * 784)
                if num_slow * sizing.tokens(slow) + num_fast * sizing.tokens(fast) <= 65536:
                    break
            assert (plan.slow_size, plan.fast_size) == (slow, fast)
        else:  # otherwise we are the reference
            assert (plan.slow_size, plan.fast_size) == (ref_slow, ref_fast)
    if (height, width) in [(1080, 1920), (360, 640), (1080, 1080)]:
        assert overshoots > 0  # the quirk we fix is real, e.g. 456 slow frames of any 16:9 source


def test_budget_raises_when_even_the_floor_does_not_fit():
    with pytest.raises(VideoError, match="budget"):
        sizing.slow_fast_budget(1080, 1920, 2000, 0)


def test_uniform_size_matches_qwen_formula():
    for (h, w), n in itertools.product(SHAPES[:6], [2, 8, 64, 768]):
        max_pixels = max(min(768 * 784, 128000 * 784 * 0.9 / n * 2), int(128 * 784 * 1.05))
        assert sizing.uniform_size(h, w, n) == qwen_ref.smart_resize(h, w, 28, 128 * 784, max_pixels)
