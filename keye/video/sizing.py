"""Frame counts and frame sizes: the arithmetic of keye-vl-utils 1.5.2 and qwen-vl-utils 0.0.14.

Everything here is pure integer/float arithmetic on shapes, no pixels, so it can be tested
exhaustively against the peers. One LM token is one 28x28 pixel block (14x14 ViT patches merged
2x2), hence ``FACTOR = 28``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from keye.errors import VideoError

FACTOR = 28
PIXELS_PER_TOKEN = FACTOR * FACTOR
MAX_RATIO = 200

# Images (qwen-vl-utils 0.0.14 / keye-vl-utils image defaults).
IMAGE_MIN_PIXELS = 4 * PIXELS_PER_TOKEN
IMAGE_MAX_PIXELS = 16384 * PIXELS_PER_TOKEN

# Keye-VL-1.5 video defaults (keye-vl-utils 1.5.2).
VIDEO_MIN_TOKENS = 48  # also the floor of a fast frame
VIDEO_MAX_TOKENS = 768
VIDEO_MIN_PIXELS = VIDEO_MIN_TOKENS * PIXELS_PER_TOKEN
VIDEO_MAX_PIXELS = VIDEO_MAX_TOKENS * PIXELS_PER_TOKEN
VIDEO_TOTAL_PIXELS = 65536 * PIXELS_PER_TOKEN
FAST_TOKEN_RATIO = 0.3
DEFAULT_FPS = 2.0
# The Slow-Fast similarity analysis runs on frames downscaled to at most 256 tokens.
ANALYSIS_MAX_PIXELS = 256 * PIXELS_PER_TOKEN

# Uniform (Slow-Fast off) defaults, qwen-vl-utils 0.0.14.
FRAME_FACTOR = 2  # Qwen2-VL's temporal patch: frames go in pairs
UNIFORM_MIN_FRAMES = 4
UNIFORM_MAX_FRAMES = 768
UNIFORM_MIN_PIXELS = 128 * PIXELS_PER_TOKEN
UNIFORM_MAX_PIXELS = 768 * PIXELS_PER_TOKEN
# qwen-vl-utils reads MODEL_SEQ_LEN (default 128000) from the environment; we use the default only.
UNIFORM_TOTAL_PIXELS = 128000 * PIXELS_PER_TOKEN * 0.9


def round_by_factor(number: float, factor: int) -> int:
    return round(number / factor) * factor


def ceil_by_factor(number: float, factor: int) -> int:
    return math.ceil(number / factor) * factor


def floor_by_factor(number: float, factor: int) -> int:
    return math.floor(number / factor) * factor


def smart_resize(
    height: int,
    width: int,
    factor: int = FACTOR,
    min_pixels: float = IMAGE_MIN_PIXELS,
    max_pixels: float = IMAGE_MAX_PIXELS,
) -> tuple[int, int]:
    """(height, width) -> (h, w), multiples of ``factor``, area in [min_pixels, max_pixels], aspect kept.

    Same arithmetic as qwen-vl-utils / keye-vl-utils ``smart_resize`` (identical in both for
    factor 28), so sizes agree with the peers to the pixel. Note the floor branch can land a few
    tokens under ``max_pixels`` and the ceil branch a few over ``min_pixels``.
    """
    if height <= 0 or width <= 0:
        raise VideoError(f"smart_resize: size must be positive, got {height}x{width}")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise VideoError(
            f"smart_resize: aspect ratio of {height}x{width} is over {MAX_RATIO} "
            f"({max(height, width) / min(height, width):.1f})"
        )
    h_bar = max(factor, round_by_factor(height, factor))
    w_bar = max(factor, round_by_factor(width, factor))
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = floor_by_factor(height / beta, factor)
        w_bar = floor_by_factor(width / beta, factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = ceil_by_factor(height * beta, factor)
        w_bar = ceil_by_factor(width * beta, factor)
    return max(h_bar, factor), max(w_bar, factor)


def tokens(size: tuple[int, int]) -> int:
    return size[0] * size[1] // PIXELS_PER_TOKEN


# ----------------------------------------------------------------------------- frame counts


def keye_nframes(total_frames: int, video_fps: float, *, fps: float | None = None, max_frames: int | None = None,
                 min_pixels: float | None = None, total_pixels: float | None = None) -> int:
    """keye-vl-utils 1.5.2 ``smart_nframes``: frames at ``fps`` (capped at the native rate), at most
    ``total_pixels / min_pixels`` frames and at most ``max_frames``. May return 0 for very short clips."""
    fps = min(DEFAULT_FPS if fps is None else fps, video_fps)
    cap = int((VIDEO_TOTAL_PIXELS if total_pixels is None else total_pixels) /
              (VIDEO_MIN_PIXELS if min_pixels is None else min_pixels))
    if max_frames is not None:
        cap = min(max_frames, cap)
    return min(int(total_frames / video_fps * fps), cap)


def qwen_nframes(total_frames: int, video_fps: float, *, fps: float | None = None, nframes: int | None = None,
                 min_frames: int | None = None, max_frames: int | None = None) -> int:
    """qwen-vl-utils 0.0.14 ``smart_nframes``: an even count in [2, total_frames]."""
    if nframes is not None:
        count = round_by_factor(nframes, FRAME_FACTOR)
    else:
        fps = DEFAULT_FPS if fps is None else fps
        lo = ceil_by_factor(UNIFORM_MIN_FRAMES if min_frames is None else min_frames, FRAME_FACTOR)
        hi = floor_by_factor(min(UNIFORM_MAX_FRAMES, total_frames) if max_frames is None else max_frames, FRAME_FACTOR)
        count = floor_by_factor(min(min(max(total_frames / video_fps * fps, lo), hi), total_frames), FRAME_FACTOR)
    if not FRAME_FACTOR <= count <= total_frames:
        raise VideoError(f"uniform sampling needs an even frame count in [{FRAME_FACTOR}, {total_frames}], got {count}")
    return count


smart_nframes = qwen_nframes  # the qwen-vl-utils name; keye_nframes is Keye-VL-1.5's variant


# ----------------------------------------------------------------------------- Slow-Fast budget


@dataclass(frozen=True)
class SlowFastBudget:
    """Sizes chosen for a clip with ``num_slow`` slow and ``num_fast`` fast frames."""

    slow_size: tuple[int, int]
    fast_size: tuple[int, int]
    num_slow: int
    num_fast: int

    @property
    def slow_tokens(self) -> int:
        return tokens(self.slow_size)

    @property
    def fast_tokens(self) -> int:
        return tokens(self.fast_size)

    @property
    def total_tokens(self) -> int:
        return self.num_slow * self.slow_tokens + self.num_fast * self.fast_tokens


def _slow_fast_sizes(height: int, width: int, min_pixels: int, slow_max_pixels: float):
    slow = smart_resize(height, width, FACTOR, min_pixels, slow_max_pixels)
    # The fast frame gets 30% of the slow frame's tokens but never under the 48-token floor
    # (keye-vl-utils 1.5.2 fetch_video).
    fast_max_pixels = max(int(tokens(slow) * FAST_TOKEN_RATIO) * PIXELS_PER_TOKEN, VIDEO_MIN_PIXELS)
    return slow, smart_resize(height, width, FACTOR, min_pixels, fast_max_pixels)


def slow_fast_budget(height: int, width: int, num_slow: int, num_fast: int, *, min_pixels: float | None = None,
                     max_pixels: float | None = None, total_pixels: float | None = None) -> SlowFastBudget:
    """Slow and fast frame sizes for a ``height`` x ``width`` source under a total-pixel budget.

    keye-vl-utils 1.5.2 binary-searches tokens-per-slow-frame t in [min_tokens, max_tokens] on an
    *estimate* (slow at t, fast at max(int(0.3 t), 48) tokens) and returns the first t whose
    estimate EXCEEDS the budget, so long clips overshoot ``video_total_pixels``. The fix: we run
    the same search, keep its answer whenever the ACTUAL sizes (after smart_resize rounding) fit
    the budget, and otherwise step t down until they do. So the result equals the reference
    whenever the reference stays within budget, and never exceeds it. Fast frames keep the
    reference's 48-token floor on their max_pixels.
    """
    min_pixels = max(int(VIDEO_MIN_PIXELS if min_pixels is None else min_pixels), VIDEO_MIN_PIXELS)
    max_pixels = VIDEO_MAX_PIXELS if max_pixels is None else max_pixels
    budget = VIDEO_TOTAL_PIXELS if total_pixels is None else total_pixels
    budget_tokens = budget / PIXELS_PER_TOKEN

    def plan_for(slow_max_pixels: float) -> SlowFastBudget:
        return SlowFastBudget(*_slow_fast_sizes(height, width, min_pixels, slow_max_pixels), num_slow, num_fast)

    # The reference search, verbatim in effect (left/right are token counts, possibly fractional).
    def estimate(t: int) -> float:
        fast_tokens = max(int(FAST_TOKEN_RATIO * t), int(min_pixels / PIXELS_PER_TOKEN))
        return (num_slow * t + num_fast * fast_tokens) * PIXELS_PER_TOKEN

    left, right = min_pixels / PIXELS_PER_TOKEN, max_pixels / PIXELS_PER_TOKEN
    while left < right:
        mid = int(left + right) // 2
        if estimate(mid) > budget:
            right = mid
        else:
            left = mid + 1
    plan = plan_for(left * PIXELS_PER_TOKEN)
    t = math.ceil(left) - 1
    t_min = math.ceil(min_pixels / PIXELS_PER_TOKEN)
    while plan.total_tokens > budget_tokens and t >= t_min:
        plan = plan_for(t * PIXELS_PER_TOKEN)
        t -= 1
    if plan.total_tokens > budget_tokens:
        raise VideoError(
            f"{num_slow + num_fast} frames of {height}x{width} need at least {plan.total_tokens} tokens, over the "
            f"budget of {budget_tokens:.0f} tokens (video_total_pixels={budget:.0f}); lower fps/max_frames"
        )
    return plan


def min_frame_tokens(height: int, width: int, min_pixels: float | None = None) -> int:
    """Fewest tokens any frame of this source can cost in Slow-Fast mode (the t = min_tokens sizes)."""
    min_pixels = max(int(VIDEO_MIN_PIXELS if min_pixels is None else min_pixels), VIDEO_MIN_PIXELS)
    slow, fast = _slow_fast_sizes(height, width, min_pixels, min_pixels)
    return max(tokens(slow), tokens(fast))


def uniform_size(height: int, width: int, nframes: int, *, min_pixels: float | None = None,
                 max_pixels: float | None = None, total_pixels: float | None = None) -> tuple[int, int]:
    """qwen-vl-utils 0.0.14 video frame size: per-frame cap from the total budget (frames in pairs)."""
    min_pixels = UNIFORM_MIN_PIXELS if min_pixels is None else min_pixels
    total_pixels = UNIFORM_TOTAL_PIXELS if total_pixels is None else total_pixels
    cap = max(min(UNIFORM_MAX_PIXELS, total_pixels / nframes * FRAME_FACTOR), int(min_pixels * 1.05))
    cap = cap if max_pixels is None else min(max_pixels, cap)
    return smart_resize(height, width, FACTOR, min_pixels, cap)
