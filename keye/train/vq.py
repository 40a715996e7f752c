"""Train the discrete visual tokenizer on frozen ViT features (``keye vq train``).

The tokenizer learns to reconstruct the frozen, 2x2-merged ViT features of a Keye model through its
N parallel codebooks (``keye.models.visual_tokenizer``): loss per merged token =
``mse + (1 - cosine)`` of the reconstruction plus the VQ codebook and commitment terms. The ViT never
trains here, so its features are computed once and cached (memory: tokens x 4 * vision hidden floats;
a corpus beyond that needs a sharded feature store, not done yet). Codebooks are k-means initialised on
those features before the first step, then the shared loop (``keye.train.runner.train``) trains the
``vq`` parameter group only.

Writes into ``--out``: ``visual_tokenizer.safetensors`` + ``visual_tokenizer.json`` (load with
``KeyeForConditionalGeneration.load_visual_tokenizer``), ``vq_report.json`` (per-codebook usage,
perplexity, reconstruction cosine on the eval frames), ``config.yaml``, ``metrics.jsonl`` and checkpoints.

    keye vq train --config tokenizers/visual/nano.yaml --out runs/vq data.videos=[runs/world/videos]
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from keye.config import load_config, save_config
from keye.errors import ConfigError, KeyeInputError
from keye.fileio import atomic_write_text
from keye.models.configuration import KeyeVisualTokenizerConfig
from keye.models.visual_tokenizer import (KeyeVisualTokenizer, code_shares, codebook_stats, merged_vit_features,
                                         save_visual_tokenizer)
from keye.processing import patchify
from keye.train.optim import apply_freeze_plan
from keye.train.runner import RunConfig, StepLoss, train
from keye.video import read_video

log = logging.getLogger(__name__)

VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")


@dataclass
class VQDataConfig:
    """Frames to learn from. ``videos`` / ``eval_videos``: files, folders (their videos) or glob patterns."""

    videos: list[str] = field(default_factory=list)
    eval_videos: list[str] = field(default_factory=list)  # empty: report on the training frames
    slow_fast: bool = True  # sample as the LM will see them (slow and fast frames)
    video_options: dict[str, Any] = field(default_factory=lambda: {"fps": 2.0, "max_frames": 16})


@dataclass
class VQTrainConfig:
    model: str = "keye-nano"  # a registered variant or a saved Keye checkpoint folder: the frozen ViT
    tokenizer: dict[str, Any] = field(default_factory=dict)  # overrides of the model's visual_tokenizer_config
    data: VQDataConfig = field(default_factory=VQDataConfig)
    kmeans_iters: int = 10
    kmeans_max_tokens: int = 65536  # k-means runs on at most this many cached features
    # a code whose usage (moving average over steps) falls below this share of a uniformly used code's is
    # moved onto a latent of the current batch; 0 turns restarts off
    restart_dead_codes: float = 0.0
    run: RunConfig = field(default_factory=lambda: RunConfig(steps=200, micro_batch=8))


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


def video_paths(patterns: list[str]) -> list[Path]:
    """Expand files, folders and glob patterns into a sorted, de-duplicated list of video files."""
    found: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found += [p for p in path.rglob("*") if p.suffix.lower() in VIDEO_SUFFIXES]
        elif path.is_file():
            found.append(path)
        else:
            matches = [Path(p) for p in glob.glob(pattern, recursive=True)]
            if not matches:
                raise KeyeInputError(f"data videos: {pattern!r} is no file, folder or matching glob pattern")
            found += [p for p in matches if p.is_file()]
    return sorted(set(found))


def vision_tower(model: nn.Module) -> tuple[nn.Module, int, int, KeyeVisualTokenizerConfig]:
    """A Keye model's ViT (set to eval, frozen), its merge size, the merged feature width and the
    model's tokenizer config."""
    config = model.config
    merge = config.projector_config.merge_size
    return model.visual.eval().requires_grad_(False), merge, config.vision_config.hidden_size * merge**2, \
        config.visual_tokenizer_config


def load_vision_tower(name_or_path: str) -> tuple[nn.Module, int, int, KeyeVisualTokenizerConfig]:
    """``vision_tower`` of a registered variant (random weights) or of a saved Keye checkpoint folder."""
    import keye.models  # noqa: F401  (registers the Auto classes)
    from keye.models import VARIANTS, build_config
    from keye.models.modeling import KeyeForConditionalGeneration

    if name_or_path in VARIANTS:
        return vision_tower(KeyeForConditionalGeneration(build_config(name_or_path)))
    if Path(name_or_path).is_dir():
        from transformers import AutoModelForImageTextToText

        return vision_tower(AutoModelForImageTextToText.from_pretrained(name_or_path))
    raise ConfigError(f"model: {name_or_path!r} is neither a variant ({', '.join(VARIANTS)}) nor a folder")


@torch.no_grad()
def frame_features(visual: nn.Module, merge: int, paths: list[Path], data: VQDataConfig) -> list[torch.Tensor]:
    """One (tokens, F) tensor of merged ViT features per sampled frame, in file order."""
    features = []
    for path in tqdm(paths, desc="ViT features", unit="video", disable=len(paths) < 50):
        clip = read_video(str(path), slow_fast=data.slow_fast, **data.video_options)
        parts = [patchify(frame) for frame in clip.frames]
        if not parts:
            continue
        grids = torch.tensor([grid for _, grid in parts])
        # one packed ViT call per clip (attention stays within each frame): same features as frame by frame
        merged = merged_vit_features(visual, torch.cat([patches for patches, _ in parts]), grids, merge).float()
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


# ----------------------------------------------------------------------------- entry


def run(cfg: VQTrainConfig, out_dir: str | Path, model: nn.Module | None = None) -> dict[str, Any]:
    """Train, evaluate and save a tokenizer into ``out_dir``; returns the report (before and after).
    ``model``: an already loaded Keye model whose ViT to use instead of loading ``cfg.model``."""
    out = Path(out_dir)
    save_config(cfg, out)
    torch.manual_seed(cfg.run.seed)  # a variant's ViT is random: seed it so the run is reproducible
    visual, merge, feature_dim, model_vq = vision_tower(model) if model is not None else load_vision_tower(cfg.model)
    unknown = sorted(set(cfg.tokenizer) - set(KeyeVisualTokenizerConfig().to_dict()))
    if unknown:
        raise ConfigError(f"tokenizer: unknown field {unknown[0]!r} of visual_tokenizer_config")
    fields = {k: v for k, v in model_vq.to_dict().items() if k not in ("model_type", "transformers_version")}
    vq_config = KeyeVisualTokenizerConfig(**{**fields, **cfg.tokenizer})

    if not cfg.data.videos:
        raise ConfigError("data.videos is empty: give video files, folders or globs, e.g. data.videos=[world/videos]")
    train_frames = frame_features(visual, merge, video_paths(cfg.data.videos), cfg.data)
    eval_frames = (frame_features(visual, merge, video_paths(cfg.data.eval_videos), cfg.data)
                   if cfg.data.eval_videos else train_frames)
    eval_features = torch.cat(eval_frames)

    tokenizer = KeyeVisualTokenizer(vq_config, feature_dim)
    all_features = torch.cat(train_frames)
    pick = torch.randperm(all_features.shape[0])[: cfg.kmeans_max_tokens]
    tokenizer.kmeans_init(all_features[pick], cfg.kmeans_iters)
    before = evaluate(tokenizer, eval_features)

    trainee = _Trainee(tokenizer, cfg.restart_dead_codes)
    apply_freeze_plan(trainee, ["vq"])
    train(trainee, train_frames, collate_features, vq_loss, lambda batch: batch.shape[0], cfg.run, out, desc="vq")

    after = evaluate(tokenizer, eval_features)
    save_visual_tokenizer(tokenizer, out)
    report = {"after_kmeans_init": before, "final": after}
    atomic_write_text(out / "vq_report.json", json.dumps(report, indent=2))
    return report


# ----------------------------------------------------------------------------- recipe stage


def videos_of(paths: list[str], run_root: Path) -> list[str]:
    """The distinct videos that a stage's jsonl rows name, as paths (rows name them relative to their file)."""
    from keye.train.common import read_rows

    found: dict[str, None] = {}
    for rel in paths:
        rows, base = read_rows([rel], run_root)
        for row in rows:
            for video in row.get("videos") or []:
                found[str(base / video)] = None
    if not found:
        raise ConfigError(f"data: the rows of {paths} name no videos")
    return list(found)


def run_vq_stage(cfg, run_root: Path) -> Path:
    """Recipe stage ``vq``: switch the previous stage's model to the discrete (Kelix) path.

    Trains the tokenizer on the frozen ViT of ``init_from`` over the videos of ``data.train`` (frames
    sampled and resized as ``video`` says, so the codes match what later stages see), reports usage on
    the videos of ``data.eval`` into ``<out>/tokenizer/vq_report.json``, and saves the discrete twin
    (same ViT and LM, ``mlp_AR`` dropped, fresh code embeddings) as this stage's model, which the next
    stages start from."""
    from keye.models.modeling import discrete_from_continuous
    from keye.train.common import load_start, save_model

    if not cfg.init_from:
        raise ConfigError("vq stage: init_from is empty; it discretises the ViT of a previous stage")
    out_dir = run_root / cfg.out
    save_config(cfg, out_dir)
    vq_cfg = VQTrainConfig(
        model=str(run_root / cfg.init_from / "model"),
        tokenizer=dict(cfg.tokenizer),
        data=VQDataConfig(
            videos=videos_of(cfg.data.train, run_root),
            eval_videos=videos_of(cfg.data.eval, run_root) if cfg.data.eval else [],
            slow_fast=cfg.video.slow_fast, video_options=cfg.video.part_defaults(),
        ),
        kmeans_iters=cfg.kmeans_iters,
        restart_dead_codes=cfg.restart_dead_codes,
        run=cfg.run,
    )
    model, processor = load_start(cfg, run_root)  # loaded once: its ViT feeds the tokenizer, then the twin is built from it
    report = run(vq_cfg, out_dir / "tokenizer", model=model)
    log.info("%s: codebooks after training\n%s", cfg.out, format_report(report["final"]))
    save_model(discrete_from_continuous(model, out_dir / "tokenizer"), processor, out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="keye vq train", description=__doc__.splitlines()[0])
    _add_arguments(parser)
    return _train_command(parser.parse_args(argv))


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="recipe YAML (e.g. tokenizers/visual/nano.yaml)")
    parser.add_argument("--out", required=True, help="run folder: tokenizer, report, metrics, checkpoints")
    parser.add_argument("overrides", nargs="*", help="KEY=VALUE config overrides, e.g. run.steps=50")


def _train_command(args: argparse.Namespace) -> int:
    from keye.train.distributed import shutdown_process_group

    cfg = load_config(VQTrainConfig, args.config, args.overrides)
    report = run(cfg, args.out)
    shutdown_process_group()  # a torchrun job's group, once training is done
    print(format_report(report["final"]))
    print(f"saved {Path(args.out) / 'visual_tokenizer.safetensors'}")
    return 0


def register(subparsers) -> None:
    vq = subparsers.add_parser("vq", help="discrete visual tokenizer (Kelix-style)")
    commands = vq.add_subparsers(dest="vq_command", metavar="ACTION", required=True)
    train_parser = commands.add_parser("train", help="train a visual tokenizer on frozen ViT features")
    _add_arguments(train_parser)
    train_parser.set_defaults(func=_train_command)
