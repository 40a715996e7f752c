"""Rasterise a clip spec into uint8 RGB frames with numpy (hard edges, no anti-aliasing).

Hard edges keep the ground truth exact: before encoding, every pixel is exactly one palette
colour, so tests can segment frames by colour and check the spec against the pixels.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from keye.data.world.scene import BACKGROUNDS, COLORS, Background, Clip
from keye.registry import registrar

# (xx_11W, yy_1H1, cx_T11, cy_T11, r) -> (T, H, W) bool. Broadcasting renders all frames at once.
ShapeMask = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray, float], np.ndarray]
SHAPE_MASKS: dict[str, ShapeMask] = {}

# The square's half-side is shrunk so its area (~2.9 r^2) sits between the triangle's (2 r^2) and
# the circle's (pi r^2 ~ 3.1 r^2) rather than dwarfing both; fill ratios stay 1.0 / 0.79 / 0.5.
SQUARE_HALF_SIDE = 0.85


register_shape = registrar(SHAPE_MASKS)


@register_shape("circle")
def _circle(xx, yy, cx, cy, r):
    return (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r


@register_shape("square")
def _square(xx, yy, cx, cy, r):
    h = r * SQUARE_HALF_SIDE
    return (np.abs(xx - cx) <= h) & (np.abs(yy - cy) <= h)


@register_shape("triangle")
def _triangle(xx, yy, cx, cy, r):
    # apex at (cx, cy - r), base from (cx - r, cy + r) to (cx + r, cy + r): half-width grows by 1/2 per row
    return (yy <= cy + r) & (np.abs(xx - cx) <= (yy - (cy - r)) / 2.0)


def object_box(shape: str, cx: float, cy: float, r: float, width: int, height: int) -> tuple[float, float, float, float] | None:
    """Pixel extent (x0, y0, x1, y1) of a shape centred at (cx, cy), clipped to the frame; None when no
    part of it is in view. Matches the masks above: the square's half-side is ``SQUARE_HALF_SIDE * r``,
    circle and triangle span r on every side (the triangle's apex at cy - r, its base at cy + r)."""
    half = r * SQUARE_HALF_SIDE if shape == "square" else r
    x0, y0, x1, y1 = max(0.0, cx - half), max(0.0, cy - half), min(float(width), cx + half), min(float(height), cy + half)
    return (x0, y0, x1, y1) if x1 > x0 and y1 > y0 else None


def render_background(background: Background, height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8."""
    frame_HW3 = np.empty((height, width, 3), dtype=np.uint8)
    frame_HW3[:] = BACKGROUNDS[background.colors[0]]
    if background.split == "vertical":
        frame_HW3[:, width // 2 :] = BACKGROUNDS[background.colors[1]]
    elif background.split == "horizontal":
        frame_HW3[height // 2 :] = BACKGROUNDS[background.colors[1]]
    return frame_HW3


def render_clip(clip: Clip) -> np.ndarray:
    """All frames of the clip: (T, H, W, 3) uint8 RGB."""
    H, W = clip.height, clip.width
    frames_THWC = np.empty((clip.num_frames, H, W, 3), dtype=np.uint8)
    yy_1H1 = np.arange(H, dtype=np.float64)[None, :, None]
    xx_11W = np.arange(W, dtype=np.float64)[None, None, :]
    for shot in clip.shots:
        block_THWC = frames_THWC[shot.start : shot.stop]
        block_THWC[:] = render_background(shot.background, H, W)[None]
        for obj in shot.objects:
            xy_T2 = shot.centers_T2(obj, clip.fps)
            mask_THW = SHAPE_MASKS[obj.shape](xx_11W, yy_1H1, xy_T2[:, 0, None, None], xy_T2[:, 1, None, None], obj.radius)
            block_THWC[mask_THW] = COLORS[obj.color]
    return frames_THWC


def zoom_crop(frame_HWC: np.ndarray, box_xyxy: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Crop [x0, x1) x [y0, y1) and enlarge it to (size, size) by nearest neighbour: (size, size, 3) uint8."""
    x0, y0, x1, y1 = box_xyxy
    crop_hwc = frame_HWC[y0:y1, x0:x1]
    rows = np.arange(size) * crop_hwc.shape[0] // size
    cols = np.arange(size) * crop_hwc.shape[1] // size
    return crop_hwc[rows][:, cols]
