"""Conversations -> model inputs: decode media (cached per clip), apply the chat template, pad a batch.

``SampleBuilder`` turns one conversation (a ShareGPT / Keye row or a parsed ``Conversation``) into an
unpadded sample: ``input_ids`` and ``labels`` (L,), assistant tokens only, plus packed pixel patches and
grids. ``collate`` pads samples into a batch the model's ``forward`` takes as keyword arguments.

Decoding dominates a small model's step time and the world reuses each clip for several questions, so
decoded clips (uint8, already resized) are kept in an LRU keyed by the media part and its options.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from keye.data.conversations import Conversation, RowFormat, parse_row
from keye.video import VisionInputs, process_vision_info


@dataclass
class VideoOptions:
    """Defaults merged into every video part that does not set them (qwen-vl-utils / keye-vl-utils keys)."""

    fps: float = 2.0
    max_frames: int | None = None
    min_pixels: int | None = None
    max_pixels: int | None = None
    video_total_pixels: int | None = None
    slow_fast: bool = True

    def part_defaults(self) -> dict[str, Any]:
        keys = ("fps", "max_frames", "min_pixels", "max_pixels", "video_total_pixels")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}


@dataclass
class Sample:
    input_ids: torch.Tensor  # (L,)
    labels: torch.Tensor  # (L,), -100 outside assistant turns
    vision: dict[str, torch.Tensor] = field(default_factory=dict)  # pixel_values[_videos], *_grid_thw
    meta: dict[str, Any] = field(default_factory=dict)


class SampleBuilder:
    """Build ``Sample``s with a ``KeyeProcessor``; ``cache_clips`` decoded clips are kept in memory."""

    def __init__(self, processor, video: VideoOptions | None = None, cache_clips: int = 4096, base_dir: str | Path = "."):
        self.processor, self.video = processor, video or VideoOptions()
        self.base_dir = Path(base_dir)
        self._cache: OrderedDict[str, Any] = OrderedDict()
        self._cache_size = cache_clips

    def messages(self, item: dict | Conversation) -> tuple[list[dict], dict]:
        """Keye messages with video defaults applied, and the row's metadata."""
        conv = item if isinstance(item, Conversation) else parse_row(item, str(item.get("id", "row")), self.base_dir, RowFormat())
        messages, meta = conv.to_messages(), conv.meta
        for message in messages:
            for part in message["content"]:
                if part["type"] == "video":
                    for key, value in self.video.part_defaults().items():
                        part.setdefault(key, value)
        return messages, meta

    def vision(self, messages: list[dict]) -> VisionInputs:
        out = VisionInputs()
        for message in messages:
            for part in message["content"]:
                if part["type"] not in ("image", "video"):
                    continue
                key = json.dumps(part, sort_keys=True, default=str)
                if key not in self._cache:
                    got = process_vision_info([{"role": "user", "content": [part]}], slow_fast=self.video.slow_fast)
                    self._cache[key] = (got.images + got.videos)[0]
                    if len(self._cache) > self._cache_size:
                        self._cache.popitem(last=False)
                self._cache.move_to_end(key)
                (out.videos if part["type"] == "video" else out.images).append(self._cache[key])
        return out

    def __call__(self, item: dict | Conversation) -> Sample:
        messages, meta = self.messages(item)
        text = self.processor.apply_chat_template(messages, think_mode=meta.get("think_mode"), add_generation_prompt=False)
        enc = self.processor(text=[text], vision=self.vision(messages), return_labels=True)
        vision = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask", "labels")}
        return Sample(enc["input_ids"][0], enc["labels"][0], vision, meta)


def collate(samples: list[Sample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad samples into (B, L) ``input_ids``, ``attention_mask``, ``labels``; concatenate patches."""
    length = max(len(s.input_ids) for s in samples)
    batch = {
        "input_ids": torch.full((len(samples), length), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros(len(samples), length, dtype=torch.long),
        "labels": torch.full((len(samples), length), -100, dtype=torch.long),
    }
    for b, s in enumerate(samples):
        n = len(s.input_ids)
        batch["input_ids"][b, :n], batch["attention_mask"][b, :n], batch["labels"][b, :n] = s.input_ids, 1, s.labels
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        parts = [s.vision[key] for s in samples if key in s.vision]
        if parts:
            batch[key] = torch.cat(parts)
    return batch


def count_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the causal LM loss is taken on (labels are shifted by one)."""
    return int((batch["labels"][:, 1:] != -100).sum())
