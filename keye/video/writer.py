"""Write frames to an mp4 (H.264 through PyAV), atomically."""

from __future__ import annotations

import os
from pathlib import Path

import av
import numpy as np

from keye.fileio import atomic_path


def write_video(path: str | os.PathLike, frames_THWC: np.ndarray, fps: float = 25.0, crf: int = 18,
                gop: int | None = None) -> Path:
    """Encode uint8 RGB frames (T, H, W, 3) into an H.264 mp4 at ``path``.

    ``gop`` caps the keyframe interval (x264 keyint), for clips that must be seekable in places.

    H and W must be even (yuv420p). The file is written beside the target and renamed into place,
    so a killed run never leaves a truncated video under the final name.
    """
    path = Path(path)
    frames_THWC = np.asarray(frames_THWC)
    if frames_THWC.ndim != 4 or frames_THWC.shape[-1] != 3 or frames_THWC.dtype != np.uint8:
        raise ValueError(f"write_video({path}): frames must be uint8 (T, H, W, 3), got {frames_THWC.dtype} {frames_THWC.shape}")
    _, height, width, _ = frames_THWC.shape
    if height % 2 or width % 2:
        raise ValueError(f"write_video({path}): height and width must be even for yuv420p, got {height}x{width}")
    with atomic_path(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=_as_fraction(fps))
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(crf), "preset": "veryfast"}
        if gop is not None:
            stream.options["x264-params"] = f"keyint={gop}:min-keyint={min(gop, 25)}"
        for frame in frames_THWC:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path


def _as_fraction(fps: float):
    from fractions import Fraction

    return Fraction(fps).limit_denominator(1001)
