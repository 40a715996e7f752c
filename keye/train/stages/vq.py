"""The ``vq`` stage: train the discrete visual tokenizer on a model's frozen ViT features, and switch the
model to the discrete (Kelix) path.

The tokenizer learns to reconstruct the frozen, 2x2-merged ViT features of a Keye model through its
N parallel codebooks (``keye.models.visual_tokenizer``): loss per merged token =
``mse + (1 - cosine)`` of the reconstruction plus the VQ codebook and commitment terms. The ViT never
trains here, so its features are computed once and cached (memory: tokens x 4 * vision hidden floats;
a corpus beyond that needs a sharded feature store, not done yet). Codebooks are k-means initialised on
those features before the first step, then the shared loop (``keye.train.runner.train``) trains the
``vq`` parameter group only.

Frames come from the videos that the rows of ``data.train`` name and from ``data.videos`` (files, folders
or glob patterns), sampled and resized as ``video`` says, so the codes match what later stages see; the
usage report is measured on the videos of ``data.eval`` / ``data.eval_videos`` (default: the training
frames). Writes into ``<run>/<out>/tokenizer``: ``visual_tokenizer.safetensors`` + ``visual_tokenizer.json``
(load with ``KeyeForConditionalGeneration.load_visual_tokenizer``), ``vq_report.json`` (per-codebook usage,
perplexity, reconstruction cosine), ``metrics.jsonl`` and checkpoints; and, with ``discrete_model`` (the
default), the discrete twin of the start model as the stage's model, which the next stages start from: the
same ViT and LM, ``mlp_AR`` dropped, and fresh code embeddings (or, ``code_embeddings: fit``, embeddings fitted
to what ``mlp_AR`` made of the same features). A tokenizer alone, outside a recipe::

    keye train tokenizers/visual/nano.yaml --run-root runs/vq init_from=../nano/stage0_vit
"""

from __future__ import annotations

import glob
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from keye.config import save_config
from keye.errors import ConfigError, KeyeInputError
from keye.fileio import atomic_write_text
from keye.models.configuration import KeyeVisualTokenizerConfig
from keye.models.vision import grid_list, previous_frame_pixels
from keye.models.visual_tokenizer import (KeyeVisualTokenizer, code_shares, codebook_stats, fit_code_embeddings,
                                         merged_vit_features, save_visual_tokenizer)
from keye.processing import patchify
from keye.train.base import DataConfig, StageConfig, load_start, read_rows, register_stage, save_model
from keye.train.optim import apply_freeze_plan
from keye.train.runner import StepLoss, train
from keye.train.session import RunConfig
from keye.video import VideoOptions, read_video

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")


TOKENIZER_DIR = "tokenizer"


@dataclass
class VQDataConfig(DataConfig):
    eval: list[str] = field(default_factory=list)  # held-out jsonl files: the usage report is measured on their videos
    videos: list[str] = field(default_factory=list)  # video files, folders or glob patterns, besides data.train's
    eval_videos: list[str] = field(default_factory=list)  # the same for the report


@dataclass
class VQConfig(StageConfig):
    train: list[str] = field(default_factory=lambda: ["vq"])
    data: VQDataConfig = field(default_factory=VQDataConfig)
    tokenizer: dict[str, Any] = field(default_factory=dict)  # overrides of the model's visual_tokenizer_config
    kmeans_iters: int = 10
    kmeans_max_tokens: int = 65536  # k-means runs on at most this many cached features
    # a code whose usage (moving average over steps) falls below this share of a uniformly used code's is
    # moved onto a latent of the current batch; 0 turns restarts off
    restart_dead_codes: float = 0.0
    discrete_model: bool = True  # save the start model's discrete twin as this stage's model (false: the tokenizer only)
    # the twin's code embeddings: "fresh" (random), or "fit": they sum to what the start model's projector makes
    # of the same features (``fit_code_embeddings``), so the decoder first sees what the continuous path would
    # show it. On the nano recipe "fit" scored 54.25% and 52.5% against 55.0% and 53.0% fresh (model card).
    code_embeddings: str = "fresh"
    run: RunConfig = field(default_factory=lambda: RunConfig(steps=200, micro_batch=8))

    def __post_init__(self):
        super().__post_init__()
        if self.code_embeddings not in ("fit", "fresh"):
            raise ConfigError(f"code_embeddings: fit or fresh, got {self.code_embeddings!r}")


class _Trainee(nn.Module):
    """Holds the tokenizer under ``visual_tokenizer`` so parameter names fall in the ``vq`` group, and the
    codes' usage for dead-code restarts (a buffer, so a checkpoint resumes it)."""

    def __init__(self, tokenizer: KeyeVisualTokenizer, restart_below: float = 0.0, decay: float = 0.9):
        super().__init__()
        self.visual_tokenizer = tokenizer
        c = tokenizer.config
        self.restart_below, self.decay = restart_below, decay
        self.register_buffer("usage_NK", torch.full((c.num_codebooks, c.codebook_size), 1.0 / c.codebook_size))

    def forward(self, features_PF: torch.Tensor) -> StepLoss:
        tokenizer = self.visual_tokenizer
        restarting = self.training and self.restart_below > 0
        # before the forward: the frozen tables are in this step's graph and must not change under it
        restarted = self._restart_dead_codes(features_PF) if restarting else 0
        out = tokenizer(features_PF)
        if restarting:
            self.usage_NK.mul_(self.decay).add_(code_shares(out.indices, self.usage_NK.shape[1]), alpha=1 - self.decay)
        terms = tokenizer.losses(out, features_PF)
        _, perplexity_N = codebook_stats(out.indices, tokenizer.config.codebook_size)
        means = {k: float(v.detach().mean()) for k, v in terms.items()}
        metrics = {
            "recon_cosine": means["cosine"],
            "recon_mse": means["mse"],
            "codebook_loss": means["codebook"],
            "commitment_loss": means["commitment"],
            "batch_perplexity": float(perplexity_N.mean()),  # one micro-batch: a trend, not the report's number
        }
        if self.restart_below > 0:
            metrics["restarted_codes"] = float(restarted)
        return StepLoss(terms["total"].sum(), None, metrics)

    @torch.no_grad()
    def _restart_dead_codes(self, features_PF: torch.Tensor) -> int:
        """Codes whose usage average fell under ``restart_below / K`` move onto randomly picked latents of
        this batch (their own slice) and start again from a uniform share. Returns how many moved."""
        N, K = self.usage_NK.shape
        dead_NK = self.usage_NK < self.restart_below / K
        if not dead_NK.any():
            return 0
        tokenizer = self.visual_tokenizer
        z_NPd = tokenizer.quantizer.slices(tokenizer.encoder(features_PF))
        restarted = 0
        for i in range(N):
            dead_k = dead_NK[i].nonzero().squeeze(-1)
            if len(dead_k):
                picks = torch.randint(0, z_NPd.shape[1], (len(dead_k),))
                tokenizer.quantizer.restart_codes(i, dead_k, z_NPd[i, picks])
                self.usage_NK[i, dead_k] = 1.0 / K
                restarted += len(dead_k)
        return restarted


# ----------------------------------------------------------------------------- data


def video_paths(patterns: list[str], root: Path = Path(".")) -> list[Path]:
    """Expand files, folders and glob patterns (relative ones under ``root``) into a sorted, de-duplicated
    list of video files."""
    found: list[Path] = []
    for pattern in patterns:
        path = root / pattern
        if path.is_dir():
            found += [p for p in path.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES]
        elif path.is_file():
            found.append(path)
        else:
            matches = [Path(p) for p in glob.glob(str(path), recursive=True)]
            if not matches:
                raise KeyeInputError(f"data videos: {str(path)!r} is no file, folder or matching glob pattern")
            found += [p for p in matches if p.is_file()]
    return sorted(set(found))


def videos_of(paths: list[str], run_root: Path) -> list[Path]:
    """The distinct videos that jsonl rows name, as paths (rows name them relative to their file)."""
    found: dict[Path, None] = {}
    for rel in paths:
        rows, base = read_rows([rel], run_root)
        for row in rows:
            for video in row.get("videos") or []:
                found[base / video] = None
    if not found:
        raise ConfigError(f"data: the rows of {paths} name no videos")
    return list(found)


def vision_tower(model: nn.Module) -> tuple[nn.Module, int, int, KeyeVisualTokenizerConfig]:
    """A Keye model's ViT (set to eval, frozen), its merge size, the merged feature width and the
    model's tokenizer config."""
    config = model.config
    merge = config.projector_config.merge_size
    return model.visual.eval().requires_grad_(False), merge, config.vision_config.hidden_size * merge**2, \
        config.visual_tokenizer_config


@torch.no_grad()
def frame_features(visual: nn.Module, merge: int, paths: list[Path], video: VideoOptions) -> list[torch.Tensor]:
    """One (tokens, F) tensor of merged ViT features per sampled frame, in file order."""
    features = []
    for path in tqdm(paths, desc="ViT features", unit="video", disable=len(paths) < 50):
        clip = read_video(str(path), slow_fast=video.slow_fast, **video.message())
        parts = [patchify(frame) for frame in clip.frames]
        if not parts:
            continue
        grids = torch.tensor([grid for _, grid in parts])
        pixels = torch.cat([patches for patches, _ in parts])
        # a tower with frame_difference sees each frame beside the one before, as in the model's own forward
        previous = (previous_frame_pixels(pixels, grid_list(grids), [len(parts)])
                    if visual.vision_model.config.frame_difference else None)
        # one packed ViT call per clip (attention stays within each frame): same features as frame by frame
        merged = merged_vit_features(visual, pixels, grids, merge, previous).float()
        features += merged.split((grids[:, 1] * grids[:, 2] // merge**2).tolist())
    if not features:
        raise KeyeInputError("data videos: no frames were read")
    return features


def collate_features(frames: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(frames)


# ----------------------------------------------------------------------------- loss and report


def vq_loss(model: _Trainee, features_PF: torch.Tensor) -> StepLoss:
    """The trainee's forward (through it, so a data-parallel wrapper sees the step)."""
    return model(features_PF)


@torch.no_grad()
def evaluate(tokenizer: KeyeVisualTokenizer, features_PF: torch.Tensor) -> dict[str, Any]:
    """Per-codebook usage and perplexity, and the reconstruction cosine, in eval mode."""
    was_training = tokenizer.training
    tokenizer.eval()
    out = tokenizer(features_PF)
    terms = tokenizer.losses(out, features_PF)
    usage_N, perplexity_N = codebook_stats(out.indices, tokenizer.config.codebook_size)
    tokenizer.train(was_training)
    return {
        "tokens": int(features_PF.shape[0]),
        "codebook_size": tokenizer.config.codebook_size,
        "usage": [round(float(u), 4) for u in usage_N],
        "perplexity": [round(float(p), 2) for p in perplexity_N],
        "recon_cosine": float(terms["cosine"].mean()),
        "recon_mse": float(terms["mse"].mean()),
    }


def format_report(report: dict[str, Any]) -> str:
    rows = [f"{'codebook':>8} {'usage':>7} {'perplexity':>10}"]
    rows += [f"{i:>8} {u:>7.1%} {p:>10.1f}" for i, (u, p) in enumerate(zip(report["usage"], report["perplexity"]))]
    rows.append(f"reconstruction cosine {report['recon_cosine']:.4f} over {report['tokens']} tokens "
                f"(K = {report['codebook_size']})")
    return "\n".join(rows)


# ----------------------------------------------------------------------------- the stage


def train_visual_tokenizer(cfg: VQConfig, model: nn.Module, videos: list[Path], eval_videos: list[Path],
                           out_dir: Path) -> tuple[dict[str, Any], KeyeVisualTokenizer, torch.Tensor]:
    """Train, evaluate and save a tokenizer on ``model``'s frozen ViT into ``out_dir``; returns the report
    (after the k-means initialisation and at the end; the caller writes it), the tokenizer and the train
    features k-means drew."""
    visual, merge, feature_dim, model_vq = vision_tower(model)
    unknown = sorted(set(cfg.tokenizer) - set(KeyeVisualTokenizerConfig().to_dict()))
    if unknown:
        raise ConfigError(f"tokenizer: unknown field {unknown[0]!r} of visual_tokenizer_config")
    fields = {k: v for k, v in model_vq.to_dict().items() if k not in ("model_type", "transformers_version")}
    vq_config = KeyeVisualTokenizerConfig(**{**fields, **cfg.tokenizer})

    train_frames = frame_features(visual, merge, videos, cfg.video)
    eval_frames = frame_features(visual, merge, eval_videos, cfg.video) if eval_videos else train_frames
    eval_features = torch.cat(eval_frames)

    torch.manual_seed(cfg.run.seed)
    tokenizer = KeyeVisualTokenizer(vq_config, feature_dim)
    all_features = torch.cat(train_frames)
    pick = torch.randperm(all_features.shape[0])[: cfg.kmeans_max_tokens]
    tokenizer.kmeans_init(all_features[pick], cfg.kmeans_iters)
    before = evaluate(tokenizer, eval_features)

    trainee = _Trainee(tokenizer, cfg.restart_dead_codes)
    apply_freeze_plan(trainee, cfg.train)
    train(trainee, train_frames, collate_features, vq_loss, lambda batch: batch.shape[0], cfg.run, out_dir,
          desc=cfg.out)

    after = evaluate(tokenizer, eval_features)
    save_visual_tokenizer(tokenizer, out_dir)
    return {"after_kmeans_init": before, "final": after}, tokenizer, all_features[pick]


@register_stage("vq", VQConfig)
def run_vq(cfg: VQConfig, run_root: Path) -> Path:
    """Tokenizer on the start model's ViT; the discrete twin as the stage's model (``discrete_model``)."""
    from keye.models.modeling import discrete_from_continuous

    out_dir = run_root / cfg.out
    save_config(cfg, out_dir)
    data = cfg.data
    if not data.train and not data.videos:
        raise ConfigError("vq stage: data.train and data.videos are both empty; name rows or videos to learn from")
    videos = sorted({*(videos_of(data.train, run_root) if data.train else []), *video_paths(data.videos, run_root)})
    eval_videos = sorted({*(videos_of(data.eval, run_root) if data.eval else []),
                          *video_paths(data.eval_videos, run_root)})
    model, processor = load_start(cfg, run_root)  # loaded once: its ViT feeds the tokenizer, then the twin is built from it
    report, tokenizer, features = train_visual_tokenizer(cfg, model, videos[: data.max_samples or None], eval_videos,
                                                        out_dir / TOKENIZER_DIR)
    log.info("%s: codebooks after training\n%s", cfg.out, format_report(report["final"]))
    if cfg.discrete_model:
        table = None
        if cfg.code_embeddings == "fit":
            with torch.no_grad():
                targets = model.mlp_AR.project_merged(features.to(model.dtype)).float()
            table, explained = fit_code_embeddings(tokenizer, features, targets)
            report["code_embeddings"] = {"fit_to": "the start model's projector", "variance_explained": explained}
            log.info("%s: code embeddings fitted to the projector's tokens, %.1f%% of their variance", cfg.out,
                     100 * explained)
        save_model(discrete_from_continuous(model, out_dir / TOKENIZER_DIR, table), processor, out_dir)
    atomic_write_text(out_dir / TOKENIZER_DIR / "vq_report.json", json.dumps(report, indent=2))
    return out_dir
