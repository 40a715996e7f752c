"""What the video front-end hands to the processor.

Frames are already resized to their model size (slow frames at ``slow_size``, fast frames at
``fast_size``), uint8, channels first. Keye-VL-1.5 counts one LM token per 28x28 pixels
(14x14 ViT patches merged 2x2), so a frame of h x w pixels costs h * w / 784 tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SLOW, FAST = 0, 1  # keye-vl-utils' frame_types convention
PIXELS_PER_TOKEN = 28 * 28


@dataclass
class VideoClip:
    """One sampled, Slow-Fast-typed, resized video.

    frames: T tensors of shape (3, H_t, W_t), uint8; H_t, W_t = slow_size or fast_size by type.
    frame_types: (T,) int32, SLOW (0) or FAST (1); all SLOW in uniform (Slow-Fast off) mode.
    timestamps: (T,) float32 seconds from the start of the source video; None for frames that come
        without times (the processor then writes a bare ``<|frame|>``; ``keye.video`` always sets them).
    indices: (T,) int64 frame indices in the source (frame list index for frame-list input).
    slow_size, fast_size: (height, width) in pixels, multiples of 28; fast_size is None when
        the clip has no fast frames.
    source_fps: native fps of the source (None for a frame list given without fps).
    backend: the decoder that read the file ("decord", "pyav"; None for a frame list).
    source_size: (height, width) of the source frames.
    budget_tokens: the Slow-Fast token budget (video_total_pixels / 784); None in uniform mode.
    """

    frames: list[torch.Tensor]
    frame_types: torch.Tensor
    timestamps: torch.Tensor | None
    indices: torch.Tensor
    slow_size: tuple[int, int]
    fast_size: tuple[int, int] | None
    source_fps: float | None = None
    backend: str | None = None
    source_size: tuple[int, int] | None = None
    budget_tokens: int | None = None

    def __len__(self) -> int:
        return len(self.frames)

    @property
    def tokens_per_frame(self) -> list[int]:
        return [f.shape[-2] * f.shape[-1] // PIXELS_PER_TOKEN for f in self.frames]

    @property
    def num_tokens(self) -> int:
        return sum(self.tokens_per_frame)


@dataclass
class ImageInput:
    """One resized image: (3, H, W) uint8 with H, W multiples of 28."""

    pixels: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return self.pixels.shape[-2] * self.pixels.shape[-1] // PIXELS_PER_TOKEN
