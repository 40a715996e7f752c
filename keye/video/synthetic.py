"""Clips with known scene cuts and static stretches, for tests, the demo and benchmarks.

Each scene is a grid of blocks, about half of them black and the rest random colours. Black vs
non-black is what makes a cut visible to the Slow-Fast analysis: in HSV all colours point into
one octant and often have cosines above 0.7, but a black patch has no direction at all, so two
independent block grids share well under 90% similar patches. Within a scene the grid stays put
(static stretches) and, optionally, a small square drifts across it, touching too few patches
to count as a change. So at the sampling rate the slow frames are exactly frame 0 and the cuts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from keye.video.writer import write_video


@dataclass
class SyntheticClip:
    """frames_THWC: uint8 (T, H, W, 3); cuts: frame indices where a new scene starts (0 excluded)."""

    frames_THWC: np.ndarray
    cuts: list[int]
    fps: float

    @property
    def scene_starts(self) -> list[int]:
        return [0, *self.cuts]


def _scene(rng: np.random.Generator, height: int, width: int, block: int) -> np.ndarray:
    rows, cols = -(-height // block), -(-width // block)
    colours_RC3 = rng.integers(40, 256, size=(rows, cols, 3), dtype=np.uint8)
    colours_RC3[rng.random((rows, cols)) < 0.5] = 0
    return np.repeat(np.repeat(colours_RC3, block, axis=0), block, axis=1)[:height, :width]


def make_cut_clip(num_frames: int = 24, height: int = 240, width: int = 320, cuts: tuple[int, ...] = (5, 11, 18),
                  fps: float = 2.0, moving: bool = True, seed: int = 0) -> SyntheticClip:
    """A clip of ``num_frames`` frames whose scenes start at 0 and at each of ``cuts``.

    ``moving`` adds a small white square drifting 4 px per frame inside each scene; without it
    every scene is a perfectly static stretch.
    """
    if any(not 0 < c < num_frames for c in cuts) or list(cuts) != sorted(set(cuts)):
        raise ValueError(f"make_cut_clip: cuts must be increasing and inside (0, {num_frames}), got {cuts}")
    rng = np.random.default_rng(seed)
    block = max(8, min(height, width) // 6)
    frames_THWC = np.empty((num_frames, height, width, 3), dtype=np.uint8)
    starts = [0, *cuts, num_frames]
    side = max(4, min(height, width) // 10)
    for start, stop in zip(starts[:-1], starts[1:]):
        background_HWC = _scene(rng, height, width, block)
        for t in range(start, stop):
            frames_THWC[t] = background_HWC
            if moving:
                x = (4 * (t - start)) % max(1, width - side)
                frames_THWC[t, height // 2:height // 2 + side, x:x + side] = 255
    return SyntheticClip(frames_THWC, list(cuts), fps)


def write_cut_clip(path: str | os.PathLike, gop: int | None = None, **kwargs) -> SyntheticClip:
    """``make_cut_clip(**kwargs)`` written to ``path`` as H.264 mp4 at the clip's fps (keyframe
    every ``gop`` frames if given)."""
    clip = make_cut_clip(**kwargs)
    write_video(Path(path), clip.frames_THWC, fps=clip.fps, gop=gop)
    return clip
