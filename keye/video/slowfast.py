"""Slow-Fast frame selection (Keye-VL-1.5 report, sec. "Slow-Fast video encoding"; keye-vl-utils 1.5.2).

A frame is SLOW (full token budget) when it differs from the last slow frame, FAST (about 30% of
the tokens) otherwise. Difference is measured on frames downscaled to <= 256 tokens, in OpenCV's
8-bit HSV, per 28x28 patch: a patch is similar when the cosine of its HSV vectors is > 0.7
(pairs of all-black patches are left out), and the frame is similar when the share of similar
patches is >= ``min_frame_similarity`` (0.9).

The chain "compare with the LAST SLOW frame" is sequential over frames; each comparison is one
vectorised reduction over all patches (no Python loop over patches). The downscale runs batched
over a chunk of frames; HSV and patch vectors run per frame, which keeps them in cache.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange

from keye.video.sizing import ANALYSIS_MAX_PIXELS, FACTOR, VIDEO_MIN_PIXELS, smart_resize
from keye.video.types import FAST, SLOW

MIN_FRAME_SIMILARITY = 0.9
PATCH_SIMILARITY = 0.7
_EPS = 1e-8

# OpenCV's fixed-point RGB2HSV (imgproc color_hsv, 8-bit path): hsv_shift = 12,
# sdiv_table[i] = round((255 << 12) / i), hdiv_table180[i] = round((180 << 12) / (6 i)), [0] = 0.
# No ties occur for i in 1..255, so integer round-half-up equals OpenCV's saturate_cast.
# S depends only on (V, V - min) and H only on (hue numerator, V - min), so both become small
# lookup tables built once here, and a conversion is a few uint8/int16 ops plus two gathers
# (several times faster than the same integer formula spelled out in tensor ops).
_HSV_SHIFT = 12
_HUE_OFFSET = 255  # hue numerators span [-255, 5 * 255]


def _hsv_tables() -> tuple[np.ndarray, np.ndarray]:
    i = np.arange(1, 256, dtype=np.int64)
    sdiv = np.concatenate([[0], (2 * (255 << _HSV_SHIFT) + i) // (2 * i)])
    hdiv = np.concatenate([[0], (2 * (180 << _HSV_SHIFT) + 6 * i) // (12 * i)])
    half = 1 << (_HSV_SHIFT - 1)
    v, diff = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    s_table = ((diff * sdiv[v] + half) >> _HSV_SHIFT).astype(np.uint8).ravel()  # [v * 256 + diff]
    num, diff = np.meshgrid(np.arange(-_HUE_OFFSET, 5 * 255 + 1), np.arange(256), indexing="ij")
    hue = (num * hdiv[diff] + half) >> _HSV_SHIFT  # arithmetic shift = floor, as in C
    h_table = np.where(hue < 0, hue + 180, hue).astype(np.uint8).ravel()  # [(num + 255) * 256 + diff]
    return s_table, h_table


_S_TABLE, _H_TABLE = _hsv_tables()


def _hsv_CHW(rgb_CHW: np.ndarray) -> np.ndarray:
    """One uint8 RGB frame (3, H, W) -> OpenCV uint8 HSV (3, H, W).

    Planar on purpose: each channel is a contiguous plane, so nothing is split or interleaved
    (measured 1.3 vs 1.7 ms per 336x588 frame for the (H, W, 3) version); this runs on every
    sampled frame and is the largest cost of the analysis.
    """
    r8, g8, b8 = rgb_CHW
    v8 = np.maximum(np.maximum(r8, g8), b8)
    diff8 = v8 - np.minimum(np.minimum(r8, g8), b8)
    hsv_CHW = np.empty(rgb_CHW.shape, dtype=np.uint8)
    s_index = v8.astype(np.uint16)
    s_index <<= 8
    s_index |= diff8
    np.take(_S_TABLE, s_index, out=hsv_CHW[1], mode="clip")  # indices are in range: "clip" skips the check
    hsv_CHW[2] = v8
    r, g, b, diff = (x.astype(np.int16) for x in (r8, g8, b8, diff8))
    # OpenCV's case order: V == R first, then V == G, else V == B.
    num = r - g
    num += 4 * diff
    np.copyto(num, b - r + 2 * diff, where=v8 == g8)
    np.copyto(num, g - b, where=v8 == r8)
    num += _HUE_OFFSET
    h_index = num.astype(np.int32)
    h_index <<= 8
    h_index |= diff8
    np.take(_H_TABLE, h_index, out=hsv_CHW[0], mode="clip")
    return hsv_CHW


def rgb_to_hsv_opencv(rgb_NCHW: torch.Tensor) -> torch.Tensor:
    """uint8 RGB (N, 3, H, W) -> uint8 HSV (N, 3, H, W), bit-exact with ``cv2.cvtColor(x, COLOR_RGB2HSV)``.

    H is in [0, 180) (degrees / 2), S and V in [0, 255]. Keeps cv2 out of the runtime dependencies.
    """
    rgb_NCHW = np.ascontiguousarray(rgb_NCHW.numpy())
    return torch.from_numpy(np.stack([_hsv_CHW(frame) for frame in rgb_NCHW]))


def analysis_size(height: int, width: int) -> tuple[int, int]:
    """Size the similarity analysis runs at: <= 256 tokens, >= 48 tokens, multiples of 28."""
    return smart_resize(height, width, FACTOR, VIDEO_MIN_PIXELS, ANALYSIS_MAX_PIXELS)


def downscale_for_analysis(frames_NCHW: torch.Tensor) -> np.ndarray:
    """Full-resolution uint8 (N, 3, H, W) -> contiguous (planar) uint8 (N, 3, h, w) at ``analysis_size``.

    Bilinear with antialiasing on the uint8 tensor, as keye-vl-utils does (its float copy is only a
    cast: the values are this uint8 result). One batched call for the chunk.
    """
    size = analysis_size(*frames_NCHW.shape[-2:])
    small_NCHW = F.interpolate(frames_NCHW, size=list(size), mode="bilinear", antialias=True)
    return np.ascontiguousarray(small_NCHW.numpy())


def patch_vectors(small_CHW: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One analysis-size frame (3, h, w) -> (HSV 28x28 patch vectors (P, 3*28*28) float32, their L2 norms (P,)).

    Per frame on purpose: the few hundred KB of temporaries stay in cache, which measured faster
    than converting a whole chunk at once (2.3 vs 3.2 ms per 252x448 frame), and only the current
    and the last slow frame's vectors are ever alive. The arithmetic runs in numpy, which is
    single-threaded: on a shared 2-core machine torch's OpenMP kernels stall on these small
    reductions (measured 32 ms vs 0.4 ms per frame comparison at load 4). Float rounding can thus
    differ from the reference in the last bit; a frame's type could only change if a patch cosine
    sat within ~1e-7 of 0.7 right at a frame-similarity boundary.
    """
    hsv_CHW = _hsv_CHW(small_CHW)
    channels, height, width = hsv_CHW.shape
    # The order inside a vector does not matter for norms and cosines. One strided copy gathers the
    # patches and casts to float32 at once (no uint8 intermediate).
    rows, cols = height // FACTOR, width // FACTOR
    patches_PD = np.empty((rows * cols, channels * FACTOR * FACTOR), dtype=np.float32)
    patches_PD.reshape(rows, cols, channels, FACTOR, FACTOR)[...] = rearrange(
        hsv_CHW, "c (h p1) (w p2) -> h w c p1 p2", p1=FACTOR, p2=FACTOR)
    norms_P = np.sqrt(np.einsum("pd,pd->p", patches_PD, patches_PD)) + _EPS
    return patches_PD, norms_P


class SlowFastSelector:
    """Streams chunks of sampled frames in order and types each one SLOW or FAST.

    Holds only the last slow frame's patch vectors between chunks, so memory does not grow with
    the clip length.
    """

    def __init__(self, min_frame_similarity: float = MIN_FRAME_SIMILARITY):
        self.threshold = min_frame_similarity
        self._slow_patches: np.ndarray | None = None  # (P, D)
        self._slow_norms: np.ndarray | None = None  # (P,)

    def _similarity(self, patches_PD: np.ndarray, norms_P: np.ndarray) -> float:
        """Share of this frame's patches similar to the last slow frame's; NaN if all are black on both."""
        cos_P = np.einsum("pd,pd->p", patches_PD, self._slow_patches) / (norms_P * self._slow_norms)
        counted_P = ~((norms_P < 0.01) & (self._slow_norms < 0.01))  # all-black pairs do not count
        counted = int(counted_P.sum())
        return int(((cos_P > PATCH_SIMILARITY) & counted_P).sum()) / counted if counted else float("nan")

    def update(self, frames_NCHW: torch.Tensor) -> torch.Tensor:
        """Type the next ``N`` frames (uint8, (N, 3, H, W), full resolution). Returns (N,) int32."""
        types_N = torch.full((len(frames_NCHW),), FAST, dtype=torch.int32)
        for i, small_CHW in enumerate(downscale_for_analysis(frames_NCHW)):
            patches_PD, norms_P = patch_vectors(small_CHW)
            # The first frame of a clip is always slow. A NaN similarity (only black patches on
            # both sides) compares False, so such a frame stays fast, as in the reference.
            if self._slow_patches is None or self._similarity(patches_PD, norms_P) < self.threshold:
                types_N[i] = SLOW
                self._slow_patches, self._slow_norms = patches_PD, norms_P
        return types_N


def select_slow_fast(frames_TCHW: torch.Tensor, min_frame_similarity: float = MIN_FRAME_SIMILARITY,
                     chunk: int = 32) -> torch.Tensor:
    """Frame types (T,) int32, SLOW=0 / FAST=1, for uint8 frames (T, 3, H, W) of one clip."""
    selector = SlowFastSelector(min_frame_similarity)
    return torch.cat([selector.update(frames_TCHW[i:i + chunk]) for i in range(0, len(frames_TCHW), chunk)])
