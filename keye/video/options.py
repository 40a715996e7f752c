"""``VideoOptions``: how one image or video is sampled and sized, in one place.

The same fields serve every entry: the qwen-vl-utils / keye-vl-utils keys of a message part
(``{"type": "video", "video": "clip.mp4", "fps": 1.0}``), the ``video:`` section of a recipe stage,
the keyword arguments of ``KeyePipeline.ask`` and the flags of every command that reads videos (generated
from the fields by ``keye.cli.options``). Keys that neither peer knows are rejected by name (a typo like
``max_frame`` would otherwise be ignored silently), and every value is range-checked here, before any
decoding starts.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from keye.errors import VideoError

MEDIA_KEYS = ("video", "image", "image_url")
# keys a message part may carry that are neither the media nor an option
_PART_KEYS = frozenset({"type", "text", *MEDIA_KEYS})
# the peers' other spellings of an option: message key -> field
ALIASES = {"video_total_pixels": "total_pixels", "sample_fps": "fps"}
# read by qwen-vl-utils for frame lists, meaningless here: accepted and ignored
_IGNORED_KEYS = frozenset({"raw_fps"})
# what a field means for an image; the others are video sampling options
IMAGE_FIELDS = frozenset({"min_pixels", "max_pixels", "resized_height", "resized_width"})


def _option(help: str, **meta: Any):
    return field(default=None, metadata={"help": help, **meta})


@dataclass(frozen=True)
class VideoOptions:
    """Sampling and sizing of one image or video; None means "the sampling mode's default".

    Every field but ``slow_fast`` is a message key. ``slow_fast`` picks the sampling mode of a whole
    call or run (Keye-VL-1.5 Slow-Fast, keye-vl-utils 1.5.2 rules, or uniform, qwen-vl-utils 0.0.14
    rules): the peers' messages have no key for it.
    """

    fps: float | None = _option("frames per second to sample (default 2)")
    nframes: int | None = _option("sample exactly this many frames (instead of fps)", integer=True)
    min_frames: int | None = _option("sample at least this many frames", integer=True)
    max_frames: int | None = _option("sample at most this many frames", integer=True)
    min_pixels: float | None = _option("smallest frame area in pixels (a token is 28x28)")
    max_pixels: float | None = _option("largest frame area in pixels")
    total_pixels: float | None = _option("token budget of the whole video x 784 (alias video_total_pixels)")
    video_start: float | None = _option("start of the clip, in seconds", inclusive=True)
    video_end: float | None = _option("end of the clip, in seconds")
    min_frame_similarity: float | None = _option("Slow-Fast: a frame this similar to the last slow one is fast "
                                                 "(0-1, default 0.9)", inclusive=True)
    resized_height: int | None = _option("resize every frame to this height (with resized_width)", integer=True)
    resized_width: int | None = _option("resize every frame to this width (with resized_height)", integer=True)
    slow_fast: bool = field(default=True, metadata={"help": "Slow-Fast sampling (Keye-VL-1.5); off: uniform "
                                                            "sampling with qwen-vl-utils rules"})

    @classmethod
    def message_fields(cls) -> tuple[str, ...]:
        """The fields that are message keys (all but ``slow_fast``)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.name != "slow_fast")

    @classmethod
    def from_message(cls, message: dict, name: str, slow_fast: bool = True) -> "VideoOptions":
        """The options a message part (or any dict of message keys) sets, validated; ``name`` names the
        part in errors. The peers' aliases (``video_total_pixels``, ``sample_fps``) are accepted."""
        known = set(cls.message_fields())
        unknown = sorted(set(message) - known - _PART_KEYS - set(ALIASES) - _IGNORED_KEYS)
        if unknown:
            keys = sorted(known | _PART_KEYS | set(ALIASES))
            raise VideoError(f"{name}: unknown message key(s) {', '.join(map(repr, unknown))}; "
                             f"known keys: {', '.join(keys)}")
        values = {k: v for k, v in message.items() if k in known and v is not None}
        if message.get("sample_fps") is not None:  # the rate a frame list was taken at; fps wins
            values.setdefault("fps", message["sample_fps"])
        budget = message.get("video_total_pixels")
        if budget is not None:
            if values.get("total_pixels", budget) != budget:
                raise VideoError(f"{name}: total_pixels={values['total_pixels']} and video_total_pixels={budget} "
                                 "disagree; give one")
            values["total_pixels"] = budget
        return cls(**values, slow_fast=slow_fast).validated(name)

    def message(self) -> dict[str, Any]:
        """The message keys this sets (None fields left out), e.g. to fill in a message part."""
        return {k: getattr(self, k) for k in self.message_fields() if getattr(self, k) is not None}

    def validated(self, name: str) -> "VideoOptions":
        """Itself, or a ``VideoError`` naming ``name`` and the first value out of range."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "slow_fast":
                if not isinstance(value, bool):
                    raise VideoError(f"{name}: slow_fast must be true or false, got {value!r}")
                continue
            if value is None:
                continue
            integer = f.metadata.get("integer", False)
            ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
            if isinstance(value, bool) or not ok_type or not math.isfinite(value):
                raise VideoError(f"{name}: {f.name} must be {'an integer' if integer else 'a number'}, got {value!r}")
            inclusive = f.metadata.get("inclusive", False)
            if value < 0 or (value == 0 and not inclusive):
                raise VideoError(f"{name}: {f.name} must be {'>=' if inclusive else '>'} 0, got {value!r}")
        if self.fps is not None and self.nframes is not None:
            raise VideoError(f"{name}: give fps or nframes, not both (fps={self.fps}, nframes={self.nframes})")
        if self.min_frame_similarity is not None and self.min_frame_similarity > 1:
            raise VideoError(f"{name}: min_frame_similarity must be in [0, 1], got {self.min_frame_similarity}")
        for low, high in (("min_pixels", "max_pixels"), ("min_frames", "max_frames")):
            if getattr(self, low) is not None and getattr(self, high) is not None and getattr(self, low) > getattr(self, high):
                raise VideoError(f"{name}: {low}={getattr(self, low)} is larger than {high}={getattr(self, high)}")
        if self.video_start is not None and self.video_end is not None and self.video_start >= self.video_end:
            raise VideoError(f"{name}: video_start={self.video_start} must be before video_end={self.video_end}")
        if (self.resized_height is None) != (self.resized_width is None):
            raise VideoError(f"{name}: give resized_height and resized_width together")
        return self

    @property
    def resized(self) -> tuple[int, int] | None:
        return None if self.resized_height is None else (self.resized_height, self.resized_width)
