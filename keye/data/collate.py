"""Conversations -> model inputs: decode media (cached per clip), apply the chat template, pad a batch.

``SampleBuilder`` turns one conversation (a ShareGPT / Keye row or a parsed ``Conversation``) into an
unpadded sample: ``input_ids`` and ``labels`` (L,), assistant tokens only, plus packed pixel patches and
grids. ``collate`` pads samples into a batch the model's ``forward`` takes as keyword arguments;
``collate_packed`` packs them several to a row instead (``keye.data.packing``).

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
from keye.data.packing import IGNORE_INDEX, pack, segment_ids
from keye.video import VideoOptions, VisionInputs, process_vision_info

VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


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
                    for key, value in self.video.message().items():
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
    return {**_padded([s.input_ids for s in samples], [s.labels for s in samples], pad_id), **_vision(samples)}


def collate_packed(samples: list[Sample], pad_id: int, pack_length: int) -> dict[str, torch.Tensor]:
    """Pack samples first-fit decreasing into rows of at most ``pack_length`` tokens, right-padded to the
    longest row: (R, L) ``input_ids``, ``attention_mask``, ``labels`` and ``segment_ids`` (the sample's
    place in its row; -1 on padding), which make the model restart positions and attention per sample.

    Labels at each sample's first token are ignored (``keye.data.packing``), which changes no loss: the
    shifted loss never reads a row's first label. Patches and grids follow the rows' sample order, the
    order their pad tokens appear in. Deterministic: the plan depends only on the samples' lengths.
    """
    rows = pack([s.input_ids for s in samples], [s.labels for s in samples], pack_length,
                names=[s.meta.get("id", i) for i, s in enumerate(samples)])
    batch = _padded([r.input_ids for r in rows], [r.labels for r in rows], pad_id)
    batch["segment_ids"] = torch.full_like(batch["input_ids"], -1)
    for b, row in enumerate(rows):
        batch["segment_ids"][b, : len(row.input_ids)] = segment_ids(row.cu_seqlens)
    return {**batch, **_vision([samples[i] for row in rows for i in row.sample_indices])}


def _padded(input_ids: list[torch.Tensor], labels: list[torch.Tensor], pad_id: int) -> dict[str, torch.Tensor]:
    length = max(len(x) for x in input_ids)
    batch = {
        "input_ids": torch.full((len(input_ids), length), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros(len(input_ids), length, dtype=torch.long),
        "labels": torch.full((len(input_ids), length), IGNORE_INDEX, dtype=torch.long),
    }
    for b, (ids, labs) in enumerate(zip(input_ids, labels)):
        n = len(ids)
        batch["input_ids"][b, :n], batch["attention_mask"][b, :n], batch["labels"][b, :n] = ids, 1, labs
    return batch


def _vision(samples: list[Sample]) -> dict[str, torch.Tensor]:
    """Each vision input concatenated over the samples, in their order."""
    out = {}
    for key in VISION_KEYS:
        parts = [s.vision[key] for s in samples if key in s.vision]
        if parts:
            out[key] = torch.cat(parts)
    return out


def count_label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens the causal LM loss is taken on (labels are shifted by one)."""
    return int((batch["labels"][:, 1:] != -100).sum())
