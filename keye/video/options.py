"""Validated per-message options: the qwen-vl-utils / keye-vl-utils message keys.

A message is a dict such as ``{"type": "video", "video": "clip.mp4", "fps": 1.0}``. Keys that
neither peer knows are rejected by name (a typo like ``max_frame`` would otherwise be ignored
silently), and every numeric value is range-checked here, before any decoding starts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from keye.errors import VideoError

MEDIA_KEYS = ("video", "image", "image_url")
# Keys the peers read besides the media itself; "text" appears when a text part is mixed in.
KNOWN_KEYS = frozenset({
    "type", "text", *MEDIA_KEYS, "resized_height", "resized_width",
    "fps", "nframes", "min_frames", "max_frames", "min_pixels", "max_pixels",
    "total_pixels", "video_total_pixels", "video_start", "video_end", "min_frame_similarity",
    "sample_fps", "raw_fps",  # qwen-vl-utils frame lists: the rate the frames were taken at
})


@dataclass(frozen=True)
class MediaOptions:
    """Options of one image or video message; None means "the mode's default"."""

    fps: float | None = None
    nframes: int | None = None
    min_frames: int | None = None
    max_frames: int | None = None
    min_pixels: float | None = None
    max_pixels: float | None = None
    total_pixels: float | None = None
    video_start: float | None = None
    video_end: float | None = None
    min_frame_similarity: float | None = None
    resized_height: int | None = None
    resized_width: int | None = None

    @classmethod
    def from_message(cls, message: dict, name: str) -> "MediaOptions":
        unknown = sorted(set(message) - KNOWN_KEYS)
        if unknown:
            raise VideoError(f"{name}: unknown message key(s) {', '.join(map(repr, unknown))}; "
                             f"known keys: {', '.join(sorted(KNOWN_KEYS))}")
        values = {f.name: message[f.name] for f in fields(cls) if message.get(f.name) is not None}
        fps = message.get("fps", message.get("sample_fps"))
        if fps is not None:
            values["fps"] = fps
        budget = [message[k] for k in ("video_total_pixels", "total_pixels") if message.get(k) is not None]
        if len(budget) == 2 and budget[0] != budget[1]:
            raise VideoError(f"{name}: total_pixels={budget[1]} and video_total_pixels={budget[0]} disagree; give one")
        if budget:
            values["total_pixels"] = budget[0]
        return cls(**values).validated(name)

    def validated(self, name: str) -> "MediaOptions":
        def number(key: str, integer: bool = False, minimum: float = 0.0, inclusive: bool = False):
            value = getattr(self, key)
            if value is None:
                return
            ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
            if isinstance(value, bool) or not ok_type or not math.isfinite(value):
                kind = "an integer" if integer else "a number"
                raise VideoError(f"{name}: {key} must be {kind}, got {value!r}")
            if value < minimum or (value == minimum and not inclusive):
                raise VideoError(f"{name}: {key} must be {'>=' if inclusive else '>'} {minimum}, got {value!r}")

        for key in ("fps", "min_pixels", "max_pixels", "total_pixels", "video_end"):
            number(key)
        for key in ("nframes", "min_frames", "max_frames", "resized_height", "resized_width"):
            number(key, integer=True)
        number("video_start", inclusive=True)
        number("min_frame_similarity", inclusive=True)
        if self.fps is not None and self.nframes is not None:
            raise VideoError(f"{name}: give fps or nframes, not both (fps={self.fps}, nframes={self.nframes})")
        if self.min_frame_similarity is not None and self.min_frame_similarity > 1:
            raise VideoError(f"{name}: min_frame_similarity must be in [0, 1], got {self.min_frame_similarity}")
        if self.min_pixels is not None and self.max_pixels is not None and self.min_pixels > self.max_pixels:
            raise VideoError(f"{name}: min_pixels={self.min_pixels} is larger than max_pixels={self.max_pixels}")
        if self.min_frames is not None and self.max_frames is not None and self.min_frames > self.max_frames:
            raise VideoError(f"{name}: min_frames={self.min_frames} is larger than max_frames={self.max_frames}")
        if (self.video_start is not None and self.video_end is not None and self.video_start >= self.video_end):
            raise VideoError(f"{name}: video_start={self.video_start} must be before video_end={self.video_end}")
        if (self.resized_height is None) != (self.resized_width is None):
            raise VideoError(f"{name}: give resized_height and resized_width together")
        return self

    @property
    def resized(self) -> tuple[int, int] | None:
        return None if self.resized_height is None else (self.resized_height, self.resized_width)
