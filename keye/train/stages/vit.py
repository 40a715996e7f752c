"""Stage 0 of Keye-VL-1.5 (report sec. 3.1): ViT continued pretraining with SigLIP's sigmoid loss.

Pairs are a frame with its own text (rows with ``frame_texts``) or a clip with its caption. The text side
is a stage-local bag-of-words tower (``siglip_head``), discarded afterwards: the point of the stage is a
vision encoder adapted to the domain, not the text tower.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from torch import nn
from torch.utils.data import ConcatDataset

from keye.errors import ConfigError, KeyeInputError
from keye.processing import patchify
from keye.data.collate import SampleBuilder
from keye.train.base import StageConfig, prepare, read_rows, register_stage, save_model
from keye.train.losses import region_sigmoid_loss, siglip_sigmoid_loss
from keye.train.optim import apply_freeze_plan
from keye.train.runner import StepLoss, train

log = logging.getLogger(__name__)


@dataclass
class VitConfig(StageConfig):
    train: list[str] = field(default_factory=lambda: ["vision", "heads"])
    siglip_frames: int = 2  # frames per clip paired with its caption (rows without frame_texts)
    # weight of the region term (each patch vs the phrase of the box holding it; rows need frame_boxes, as
    # the world's frames.jsonl has); 0 turns it off
    siglip_regions: float = 0.0
    # the region term's phrase per box: "box", the box's own ("red circle"); "listing", the frame text's entry
    # for that object, place words included ("red circle top left"), so a patch must also know where it sits
    siglip_region_phrases: Literal["box", "listing"] = "box"
    # pair each frame with its background first ("navy: red circle top left", from the rows'
    # frame_backgrounds), so the tower keeps the colour a cut changes in its tokens
    siglip_backgrounds: bool = False


class SiglipHead(nn.Module):
    """Projections into a shared space, a bag-of-words text tower and SigLIP's temperature and bias
    (initialised to log 10 and -10 as in the paper, sec. 3.1). The region term has its own patch
    projection, temperature and bias: it sees tens of phrases per batch, not thousands of texts, so its
    bias starts near log(1 / phrases) rather than at -10."""

    def __init__(self, vision_dim: int, vocab_size: int, dim: int = 64):
        super().__init__()
        self.image_proj = nn.Linear(vision_dim, dim)
        self.text_embed = nn.EmbeddingBag(vocab_size, dim, mode="mean")
        self.text_proj = nn.Linear(dim, dim)
        self.logit_scale = nn.Parameter(torch.tensor(2.302585))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))
        self.region_proj = nn.Linear(vision_dim, dim)
        self.region_scale = nn.Parameter(torch.tensor(2.302585))
        self.region_bias = nn.Parameter(torch.tensor(-2.5))

    def embed_texts(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.text_proj(self.text_embed(ids, offsets))


class SiglipPair(nn.Module):
    """The Keye vision tower beside the stage's head; parameter names keep the ``visual.`` prefix."""

    def __init__(self, visual: nn.Module, head: SiglipHead):
        super().__init__()
        self.visual, self.siglip_head = visual, head

    def forward(self, batch: dict, region_weight: float = 0.0) -> StepLoss:
        """SigLIP on (frame or clip, text) pairs; with ``region_weight`` > 0, plus that weight times the
        region term: every patch against the batch's grounded phrases, positive only for the phrase whose
        box holds it. Pooling alone lets the tower spread a frame's content over all its tokens and lose
        which colour goes with which shape; the region term keeps each patch about what lies under it."""
        feats_ND = self.visual(batch["pixel_values"], batch["grid_thw"])
        per_frame = (batch["grid_thw"].prod(-1)).tolist()
        frame_means = torch.stack([f.mean(0) for f in feats_ND.split(per_frame)])
        clip_means = torch.stack([f.mean(0) for f in frame_means.split(batch["frames_per_clip"])])
        head = self.siglip_head
        image_BD = head.image_proj(clip_means)
        text_BD = head.embed_texts(batch["text_ids"], batch["text_offsets"])
        loss = siglip_sigmoid_loss(image_BD, text_BD, head.logit_scale, head.logit_bias)
        metrics = {"logit_scale": float(head.logit_scale.detach().exp())}
        if region_weight > 0 and len(batch.get("phrase_offsets", ())):
            phrase_KD = head.embed_texts(batch["phrase_ids"], batch["phrase_offsets"])
            region = region_sigmoid_loss(head.region_proj(feats_ND), phrase_KD, batch["patch_phrase"],
                                         head.region_scale, head.region_bias)
            metrics |= {"frame_loss": float(loss.detach()), "region_loss": float(region.detach())}
            loss = loss + region_weight * region
        return StepLoss(loss_sum=loss * len(image_BD), metrics=metrics)


class Regions(NamedTuple):
    """A frame's grounded phrases and, per ViT patch, the index of the phrase whose box holds the
    patch centre (the smallest such box), or -1."""

    phrases: list[str]
    patch_phrase_P: torch.Tensor


def patch_regions(boxes: list[list], grid: tuple[int, int, int]) -> Regions:
    """``boxes``: [[phrase, x0, y0, x1, y1], ...] relative to the frame (0-1) -> ``Regions`` of the
    (1, h, w) patch grid, raster order."""
    _, h, w = grid
    if not boxes:
        return Regions([], torch.full((h * w,), -1))
    box_K4 = torch.tensor([b[1:] for b in boxes], dtype=torch.float64)
    cy_P, cx_P = ((torch.stack(torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")).flatten(1) + 0.5)
                  / torch.tensor([h, w])[:, None])
    inside_PK = ((box_K4[:, 0] <= cx_P[:, None]) & (cx_P[:, None] < box_K4[:, 2])
                 & (box_K4[:, 1] <= cy_P[:, None]) & (cy_P[:, None] < box_K4[:, 3]))
    area_K = (box_K4[:, 2] - box_K4[:, 0]) * (box_K4[:, 3] - box_K4[:, 1])
    smallest_P = torch.where(inside_PK, area_K, torch.inf).argmin(-1)
    return Regions([b[0] for b in boxes], torch.where(inside_PK.any(-1), smallest_P, -1))


class ClipCaptionDataset:
    """(frames of a clip, caption ids): ``frames`` evenly spaced frames of each captioned clip."""

    def __init__(self, rows: list[dict], builder: SampleBuilder, frames: int):
        self.rows, self.builder, self.frames = rows, builder, frames

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        row = self.rows[index]
        messages, _ = self.builder.messages(row)
        clip = self.builder.vision(messages).videos[0]
        picks = torch.linspace(0, len(clip) - 1, min(self.frames, len(clip))).round().long().tolist()
        patches, grids = zip(*(patchify(clip.frames[i]) for i in picks))
        ids = self.builder.processor.tokenizer(row["caption"], add_special_tokens=False)["input_ids"]
        patches = torch.cat(patches)
        return patches, torch.tensor(grids), torch.tensor(ids), Regions([], torch.full((len(patches),), -1))


class FrameCaptionDataset:
    """(one frame, its own text): for rows that describe every frame (``frame_texts``: [seconds, text]
    pairs, as in the world's ``frames.jsonl``). Frame-level pairs tie each text to the pixels it names,
    where a clip caption is spread over every frame of the clip. The frame is the decoded one nearest
    to the text's time; with ``backgrounds`` the text starts with the frame's background, from the row's
    ``frame_backgrounds`` ("navy: red circle top left"). Rows with ``frame_boxes`` ([seconds, [[phrase, x0,
    y0, x1, y1], ...]] per listed frame) also ground each phrase in the patches under its box (``Regions``)."""

    def __init__(self, rows: list[dict], builder: SampleBuilder, phrases: str = "box", backgrounds: bool = False):
        self.builder = builder
        self.items: list[tuple[dict, float, str]] = []
        self.boxes: list[list] = []  # per item: [[phrase, x0, y0, x1, y1], ...], empty for rows without boxes
        for row in rows:
            named = row.get("frame_backgrounds") if backgrounds else None
            if backgrounds and (named is None or len(named) != len(row["frame_texts"])):
                got = "none" if named is None else len(named)
                raise KeyeInputError(f"row {row.get('id')!r}: siglip_backgrounds needs frame_backgrounds, one per "
                                     f"frame_texts entry (the world's frames.jsonl writes them; regenerate an older "
                                     f"world); got {got} for {len(row['frame_texts'])}")
            self.items += [(row, float(t), text if named is None else f"{named[i]}: {text}")
                           for i, (t, text) in enumerate(row["frame_texts"])]
            boxes = row.get("frame_boxes")
            if boxes is not None and len(boxes) != len(row["frame_texts"]):
                raise KeyeInputError(f"row {row.get('id')!r}: frame_boxes must list the same frames as frame_texts")
            if boxes is None:
                self.boxes += [[]] * len(row["frame_texts"])
            elif phrases == "listing":
                self.boxes += [listing_phrases(row.get("id"), b, text)
                               for (_, b), (_, text) in zip(boxes, row["frame_texts"])]
            else:
                self.boxes += [b for _, b in boxes]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        row, seconds, text = self.items[index]
        messages, _ = self.builder.messages(row)
        clip = self.builder.vision(messages).videos[0]
        nearest = int(torch.as_tensor(clip.timestamps, dtype=torch.float64).sub(seconds).abs().argmin())
        patches, grid = patchify(clip.frames[nearest])
        ids = self.builder.processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        return patches, torch.tensor([grid]), torch.tensor(ids), patch_regions(self.boxes[index], grid)


def listing_phrases(row_id, boxes: list[list], text: str) -> list[list]:
    """A frame's boxes with each phrase replaced by the frame text's entry for it: the text lists the boxed
    objects in the same order, one comma-separated entry each, starting with the box's phrase ("red circle"
    -> "red circle top left"). A text that does not line up is an error naming the row."""
    entries = [e.strip() for e in text.split(",")] if boxes else []
    if len(entries) != len(boxes) or any(not e.startswith(b[0]) for e, b in zip(entries, boxes)):
        raise KeyeInputError(f"row {row_id!r}: siglip_region_phrases: listing needs one frame_texts entry per "
                             f"box, in order, each starting with the box's phrase; got {text!r} for "
                             f"{[b[0] for b in boxes]}")
    return [[e, *b[1:]] for e, b in zip(entries, boxes)]


def siglip_pairs(rows: list[dict], builder: SampleBuilder, frames: int, files: list[str], phrases: str = "box",
                 backgrounds: bool = False):
    """Stage 0's pairs: each row with ``frame_texts`` gives one pair per listed frame, every other row one
    clip/caption pair; files may mix both. A row with neither is a ConfigError naming it."""
    unusable = [row.get("id", f"#{i}") for i, row in enumerate(rows) if "frame_texts" not in row and "caption" not in row]
    if unusable:
        raise ConfigError(
            f"data.train {files}: stage 0 needs a 'caption' or 'frame_texts' field; {len(unusable)} rows have "
            f"neither (first: {unusable[:3]})"
        )
    per_frame = [row for row in rows if "frame_texts" in row]
    per_clip = [row for row in rows if "frame_texts" not in row]
    parts = ([FrameCaptionDataset(per_frame, builder, phrases, backgrounds)] if per_frame else []) + (
        [ClipCaptionDataset(per_clip, builder, frames)] if per_clip else [])
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


def siglip_collate(samples, tokenizer=None):
    """Pairs -> one batch. With a ``tokenizer``, the batch's distinct grounded phrases are tokenized
    (``phrase_ids`` / ``phrase_offsets``) and ``patch_phrase`` indexes them per patch (-1: none)."""
    patches, grids, ids, regions = zip(*samples)
    batch = {
        "pixel_values": torch.cat(patches),
        "grid_thw": torch.cat(grids),
        "frames_per_clip": [len(g) for g in grids],
        "text_ids": torch.cat(ids),
        "text_offsets": _offsets([len(i) for i in ids]),
    }
    if tokenizer is not None:
        phrases = list(dict.fromkeys(p for r in regions for p in r.phrases))
        index = {p: k for k, p in enumerate(phrases)}
        batch["patch_phrase"] = torch.cat([
            torch.tensor([index[p] for p in r.phrases] + [-1])[r.patch_phrase_P] for r in regions])  # -1 -> the appended -1
        tokens = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in phrases]
        batch["phrase_ids"] = torch.tensor([t for ts in tokens for t in ts], dtype=torch.long)
        batch["phrase_offsets"] = _offsets([len(t) for t in tokens])
    return batch


def _offsets(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0)[:-1].tolist()], dtype=torch.long)


def siglip_loss_fn(pair: SiglipPair, batch, region_weight: float = 0.0) -> StepLoss:
    """Stage 0's loss: the pair's forward (through it, so a data-parallel wrapper sees the step)."""
    return pair(batch, region_weight)


@register_stage("vit", VitConfig)
def run_vit(cfg: VitConfig, run_root: Path) -> Path:
    model, processor, out_dir = prepare(cfg, run_root)
    rows, base = read_rows(cfg.data.train, run_root)
    if cfg.data.max_samples:
        rows = rows[: cfg.data.max_samples]
    builder = SampleBuilder(processor, cfg.video, base_dir=base)
    torch.manual_seed(cfg.run.seed)  # the head is new in every run: seeded, whatever model the stage starts from
    head = SiglipHead(model.config.vision_config.hidden_size, len(processor.tokenizer))
    pair = SiglipPair(model.visual, head)
    # prepare() logged the counts before the head existed; these include it
    log.info("%s: trainable parameters with the SigLIP head %s", cfg.out, apply_freeze_plan(pair, cfg.train))
    dataset = siglip_pairs(rows, builder, cfg.siglip_frames, cfg.data.train, cfg.siglip_region_phrases,
                           cfg.siglip_backgrounds)
    log.info("%s: %d image/text pairs", cfg.out, len(dataset))
    if cfg.siglip_regions > 0 and not any(row.get("frame_boxes") for row in rows):
        raise ConfigError(f"siglip_regions: {cfg.siglip_regions} asks for the region term, but no row of {cfg.data.train} "
                          "has frame_boxes (a world generated before version 4? generate it again)")
    regions = cfg.siglip_regions > 0
    train(pair, dataset, functools.partial(siglip_collate, tokenizer=processor.tokenizer if regions else None),
          functools.partial(siglip_loss_fn, region_weight=cfg.siglip_regions),
          lambda batch: len(batch["frames_per_clip"]), cfg.run, out_dir, desc=cfg.out)
    return save_model(model, processor, out_dir)
