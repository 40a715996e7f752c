"""Stage 0 of Keye-VL-1.5 (report sec. 3.1): ViT continued pretraining with SigLIP's sigmoid loss.

Pairs are a frame with its own text (rows with ``frame_texts``) or a clip with its caption. The text side
is a stage-local bag-of-words tower (``siglip_head``), discarded afterwards: the point of the stage is a
vision encoder adapted to the domain, not the text tower.

Two per-patch terms ground what the pooled loss spreads out: the region term (each patch against the phrase
of the box holding it) and, for a tower with ``frame_difference``, the motion term (each patch of an object
seen in the frame before too against "moves left" ... "stays still"), which is how a token learns which way
the object under it moves.
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
from keye.models.vision import enable_frame_difference
from keye.processing import patchify
from keye.data.collate import SampleBuilder
from keye.data.world.scene import MOTIONS, STILL, moved
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
    # give the tower the frame-difference embedding (``KeyeVisionConfig.frame_difference``; zero where the start
    # lacks it) and show each frame with the sampled frame before it
    frame_difference: bool = False
    # weight of the motion term: each patch inside the box of an object listed in the frame before too, against
    # the five motion phrases ("moves left" ... "stays still", from the rows' frame_boxes), positive for the way
    # that object moved since; needs frame_difference (one frame shows no motion). 0 turns it off
    siglip_motion: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if self.siglip_motion > 0 and not self.frame_difference:
            raise ConfigError(f"siglip_motion: {self.siglip_motion} needs frame_difference: true (one frame shows "
                              "no motion)")


class SiglipHead(nn.Module):
    """Projections into a shared space, a bag-of-words text tower and SigLIP's temperature and bias
    (initialised to log 10 and -10 as in the paper, sec. 3.1). The region term has its own patch
    projection, temperature and bias: it sees tens of phrases per batch, not thousands of texts, so its
    bias starts near log(1 / phrases) rather than at -10."""

    def __init__(self, vision_dim: int, vocab_size: int, dim: int = 64, motion: bool = False):
        super().__init__()
        self.image_proj = nn.Linear(vision_dim, dim)
        self.text_embed = nn.EmbeddingBag(vocab_size, dim, mode="mean")
        self.text_proj = nn.Linear(dim, dim)
        self.logit_scale = nn.Parameter(torch.tensor(2.302585))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0))
        self.region_proj = nn.Linear(vision_dim, dim)
        self.region_scale = nn.Parameter(torch.tensor(2.302585))
        self.region_bias = nn.Parameter(torch.tensor(-2.5))
        if motion:  # made last, and only when used, so the parameters above draw the same initial values
            self.motion_proj = nn.Linear(vision_dim, dim)
            self.motion_scale = nn.Parameter(torch.tensor(2.302585))
            self.motion_bias = nn.Parameter(torch.tensor(-2.5))

    def embed_texts(self, ids: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.text_proj(self.text_embed(ids, offsets))


class SiglipPair(nn.Module):
    """The Keye vision tower beside the stage's head; parameter names keep the ``visual.`` prefix."""

    def __init__(self, visual: nn.Module, head: SiglipHead):
        super().__init__()
        self.visual, self.siglip_head = visual, head

    def forward(self, batch: dict, region_weight: float = 0.0, motion_weight: float = 0.0) -> StepLoss:
        """SigLIP on (frame or clip, text) pairs; with ``region_weight`` > 0, plus that weight times the
        region term: every patch against the batch's grounded phrases, positive only for the phrase whose
        box holds it. Pooling alone lets the tower spread a frame's content over all its tokens and lose
        which colour goes with which shape; the region term keeps each patch about what lies under it."""
        feats_ND = self.visual(batch["pixel_values"], batch["grid_thw"], batch.get("previous_pixels"))
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
        if motion_weight > 0:
            motion_KD = head.embed_texts(batch["motion_ids"], batch["motion_offsets"])
            motion = region_sigmoid_loss(head.motion_proj(feats_ND), motion_KD, batch["patch_motion"],
                                         head.motion_scale, head.motion_bias)
            metrics["motion_loss"] = float(motion.detach())
            loss = loss + motion_weight * motion
        return StepLoss(loss_sum=loss * len(image_BD), metrics=metrics)


class Regions(NamedTuple):
    """A frame's grounded phrases and, per ViT patch, the index of the phrase whose box holds the
    patch centre (the smallest such box), or -1; with motion, per patch the index in ``MOTION_PHRASES`` of
    the way that box's object moved since the frame before, or -1 (no box, or an object new in view)."""

    phrases: list[str]
    patch_phrase_P: torch.Tensor
    patch_motion_P: torch.Tensor | None = None


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
    """(frames of a clip, caption ids): ``frames`` evenly spaced frames of each captioned clip. With
    ``previous``, the frames also come as their own "frame before": spaced apart, they are no sequence."""

    def __init__(self, rows: list[dict], builder: SampleBuilder, frames: int, previous: bool = False):
        self.rows, self.builder, self.frames, self.previous = rows, builder, frames, previous

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
        return (patches, torch.tensor(grids), torch.tensor(ids), Regions([], torch.full((len(patches),), -1)),
                patches if self.previous else None)


class FrameCaptionDataset:
    """(one frame, its own text): for rows that describe every frame (``frame_texts``: [seconds, text]
    pairs, as in the world's ``frames.jsonl``). Frame-level pairs tie each text to the pixels it names,
    where a clip caption is spread over every frame of the clip. The frame is the decoded one nearest
    to the text's time; with ``backgrounds`` the text starts with the frame's background, from the row's
    ``frame_backgrounds`` ("navy: red circle top left"). Rows with ``frame_boxes`` ([seconds, [[phrase, x0,
    y0, x1, y1], ...]] per listed frame) also ground each phrase in the patches under its box (``Regions``).
    With ``previous`` each pair also holds the sampled frame before (a tower with ``frame_difference`` reads
    it; a clip's first frame stands in for its own)."""

    def __init__(self, rows: list[dict], builder: SampleBuilder, phrases: str = "box", backgrounds: bool = False,
                 motion: bool = False, previous: bool = False):
        self.builder, self.previous = builder, previous
        self.items: list[tuple[dict, float, str]] = []
        self.boxes: list[list] = []  # per item: [[phrase, x0, y0, x1, y1], ...], empty for rows without boxes
        self.motions: list[list[int]] | None = [] if motion else None  # per item, per box: box_motions
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
                if motion:
                    self.motions += [[]] * len(row["frame_texts"])
            elif phrases == "listing":
                self.boxes += [listing_phrases(row.get("id"), b, text)
                               for (_, b), (_, text) in zip(boxes, row["frame_texts"])]
            else:
                self.boxes += [b for _, b in boxes]
            if motion and boxes is not None:  # nothing has moved in a shot's first frame (a cut changes the background)
                grounds = row.get("frame_backgrounds") or [None] * len(boxes)
                self.motions += [box_motions(b, boxes[j - 1][1] if j and grounds[j] == grounds[j - 1] else [])
                                 for j, (_, b) in enumerate(boxes)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        row, seconds, text = self.items[index]
        messages, _ = self.builder.messages(row)
        clip = self.builder.vision(messages).videos[0]
        nearest = int(torch.as_tensor(clip.timestamps, dtype=torch.float64).sub(seconds).abs().argmin())
        patches, grid = patchify(clip.frames[nearest])
        previous = None
        if self.previous:
            previous = patchify(clip.frames[nearest - 1])[0] if nearest > 0 else patches
            previous = previous if previous.shape == patches.shape else patches
        ids = self.builder.processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        regions = patch_regions(self.boxes[index], grid)
        if self.motions is not None:
            per_box = torch.tensor([*self.motions[index], -1], dtype=torch.long)  # patch_phrase -1 -> the last
            regions = regions._replace(patch_motion_P=per_box[regions.patch_phrase_P])
        return patches, torch.tensor([grid]), torch.tensor(ids), regions, previous


MOTION_PHRASES = tuple("stays still" if m == STILL else f"moves {m}" for m in MOTIONS)  # "moves left", ...


def box_motions(boxes: list[list], before: list[list], still: float = 0.005) -> list[int]:
    """For each of a frame's ``boxes`` ([phrase, x0, y0, x1, y1], relative to the frame), the index in
    ``MOTION_PHRASES`` of the way its centre moved since ``before`` (the frame before's boxes, matched by
    phrase): the larger axis's direction, or still under ``still`` (a share of the frame); -1 for an object
    new in view."""
    centres = {b[0]: ((b[1] + b[3]) / 2, (b[2] + b[4]) / 2) for b in before}
    out = []
    for phrase, x0, y0, x1, y1 in boxes:
        if phrase not in centres:
            out.append(-1)
            continue
        dx, dy = (x0 + x1) / 2 - centres[phrase][0], (y0 + y1) / 2 - centres[phrase][1]
        out.append(MOTIONS.index(moved(dx, dy, still)))
    return out


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
                 backgrounds: bool = False, motion: bool = False, previous: bool = False):
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
    parts = ([FrameCaptionDataset(per_frame, builder, phrases, backgrounds, motion, previous)] if per_frame else []) + (
        [ClipCaptionDataset(per_clip, builder, frames, previous)] if per_clip else [])
    return parts[0] if len(parts) == 1 else ConcatDataset(parts)


def siglip_collate(samples, tokenizer=None):
    """Pairs -> one batch. With a ``tokenizer``, the batch's distinct grounded phrases are tokenized
    (``phrase_ids`` / ``phrase_offsets``) and ``patch_phrase`` indexes them per patch (-1: none)."""
    patches, grids, ids, regions, previous = zip(*samples)
    batch = {
        "pixel_values": torch.cat(patches),
        "grid_thw": torch.cat(grids),
        "frames_per_clip": [len(g) for g in grids],
        "text_ids": torch.cat(ids),
        "text_offsets": _offsets([len(i) for i in ids]),
    }
    if all(p is not None for p in previous):  # the frames before, where the dataset was asked for them
        batch["previous_pixels"] = torch.cat(previous)
    if tokenizer is not None:
        phrases = list(dict.fromkeys(p for r in regions for p in r.phrases))
        index = {p: k for k, p in enumerate(phrases)}
        batch["patch_phrase"] = torch.cat([
            torch.tensor([index[p] for p in r.phrases] + [-1])[r.patch_phrase_P] for r in regions])  # -1 -> the appended -1
        tokens = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in phrases]
        batch["phrase_ids"] = torch.tensor([t for ts in tokens for t in ts], dtype=torch.long)
        batch["phrase_offsets"] = _offsets([len(t) for t in tokens])
    if tokenizer is not None and any(r.patch_motion_P is not None for r in regions):
        batch["patch_motion"] = torch.cat([r.patch_motion_P if r.patch_motion_P is not None
                                           else torch.full_like(r.patch_phrase_P, -1) for r in regions])
        tokens = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in MOTION_PHRASES]
        batch["motion_ids"] = torch.tensor([t for ts in tokens for t in ts], dtype=torch.long)
        batch["motion_offsets"] = _offsets([len(t) for t in tokens])
    return batch


def _offsets(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0)[:-1].tolist()], dtype=torch.long)


def siglip_loss_fn(pair: SiglipPair, batch, region_weight: float = 0.0, motion_weight: float = 0.0) -> StepLoss:
    """Stage 0's loss: the pair's forward (through it, so a data-parallel wrapper sees the step)."""
    return pair(batch, region_weight, motion_weight)


@register_stage("vit", VitConfig)
def run_vit(cfg: VitConfig, run_root: Path) -> Path:
    model, processor, out_dir = prepare(cfg, run_root)
    rows, base = read_rows(cfg.data.train, run_root)
    if cfg.data.max_samples:
        rows = rows[: cfg.data.max_samples]
    builder = SampleBuilder(processor, cfg.video, base_dir=base)
    torch.manual_seed(cfg.run.seed)  # the head is new in every run: seeded, whatever model the stage starts from
    if cfg.frame_difference and enable_frame_difference(model.visual):
        log.info("%s: the tower gains the frame-difference embedding (zero at the start)", cfg.out)
    head = SiglipHead(model.config.vision_config.hidden_size, len(processor.tokenizer), motion=cfg.siglip_motion > 0)
    pair = SiglipPair(model.visual, head)
    # prepare() logged the counts before the head existed; these include it
    log.info("%s: trainable parameters with the SigLIP head %s", cfg.out, apply_freeze_plan(pair, cfg.train))
    dataset = siglip_pairs(rows, builder, cfg.siglip_frames, cfg.data.train, cfg.siglip_region_phrases,
                           cfg.siglip_backgrounds, cfg.siglip_motion > 0, cfg.frame_difference)
    log.info("%s: %d image/text pairs", cfg.out, len(dataset))
    if cfg.siglip_regions > 0 and not any(row.get("frame_boxes") for row in rows):
        raise ConfigError(f"siglip_regions: {cfg.siglip_regions} asks for the region term, but no row of {cfg.data.train} "
                          "has frame_boxes (a world generated before version 4? generate it again)")
    if cfg.siglip_motion > 0 and not any(row.get("frame_boxes") for row in rows):
        raise ConfigError(f"siglip_motion: {cfg.siglip_motion} asks for the motion term, but no row of "
                          f"{cfg.data.train} has frame_boxes")
    grounded = cfg.siglip_regions > 0 or cfg.siglip_motion > 0
    train(pair, dataset, functools.partial(siglip_collate, tokenizer=processor.tokenizer if grounded else None),
          functools.partial(siglip_loss_fn, region_weight=cfg.siglip_regions, motion_weight=cfg.siglip_motion),
          lambda batch: len(batch["frames_per_clip"]), cfg.run, out_dir, desc=cfg.out)
    return save_model(model, processor, out_dir)
