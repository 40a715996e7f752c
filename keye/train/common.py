"""What every supervised stage shares: its config, loading the model it starts from, data, LoRA, saving.

A stage is one YAML file (``pipelines/<size>/<stage>.yaml``) resolved into ``StageConfig``. Paths in it
are relative to the recipe's run folder (``runs/nano`` by default), so a recipe reads the world it
generated and each stage starts from the folder the previous one wrote (``init_from``). A finished stage
leaves ``<run>/<out>/model`` (``save_pretrained`` format, safetensors) beside its checkpoints, metrics,
loss curve and resolved ``config.yaml``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from keye.config import load_config, save_config
from keye.data.collate import SampleBuilder, VideoOptions, collate, collate_packed, count_label_tokens
from keye.data.conversations import SkipBadSamples
from keye.errors import ConfigError, KeyeInputError
from keye.train.distributed import gathered_state_dict, has_sharded_weights
from keye.train.optim import apply_freeze_plan
from keye.train.runner import RunConfig, StepLoss

log = logging.getLogger(__name__)
MODEL_DIR = "model"


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # jsonl files, relative to the run folder
    eval: list[str] = field(default_factory=list)  # held-out jsonl files (the vq stage reports codebook usage on their videos)
    modes: dict[str, float] = field(default_factory=dict)  # mode mixture of LM stages (keye.data.modes); empty: rows as written
    max_samples: int | None = None
    seed: int = 0


@dataclass
class LoraSettings:
    enabled: bool = False
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    # transformers' fused MoE experts are 3D parameters, not Linear modules: peft reaches them by name
    target_parameters: list[str] = field(default_factory=lambda: ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])


@dataclass
class StageConfig:
    stage: str = "sft"  # a name in keye.train.STAGES
    out: str = ""  # folder under the run folder; default: the stage name
    model: str = "keye-nano"  # registered variant, used when init_from is empty
    init_from: str | None = None  # a previous stage's folder (relative to the run folder)
    train: list[str] = field(default_factory=lambda: ["vision", "projector", "lm"])  # groups that train
    data: DataConfig = field(default_factory=DataConfig)
    video: VideoOptions = field(default_factory=VideoOptions)
    run: RunConfig = field(default_factory=RunConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    max_length: int | None = None  # drop longer samples (counted); None keeps all
    # LM stages: pack each micro-batch's samples into rows of max_length tokens (needs max_length), with
    # per-sample positions and attention (keye.data.packing); run.micro_batch still counts samples
    packing: bool = False
    rope_theta: float | None = None  # anneal: context extension by a larger RoPE base
    merge_seeds: list[int] = field(default_factory=list)  # anneal: one run per seed, weights averaged
    siglip_frames: int = 2  # vit stage: frames per clip paired with its caption
    # vit stage: weight of the region term (each patch vs the phrase of the box holding it; rows need
    # frame_boxes, as the world's frames.jsonl has); 0 turns it off
    siglip_regions: float = 0.0
    # vq stage: overrides of the visual_tokenizer_config (e.g. {codebook_size: 512}) and its k-means init
    tokenizer: dict[str, Any] = field(default_factory=dict)
    kmeans_iters: int = 10
    restart_dead_codes: float = 0.0  # vq stage: see keye.train.vq.VQTrainConfig


def load_stage_config(path: str | os.PathLike, overrides: list[str] | None = None) -> StageConfig:
    cfg = load_config(StageConfig, path, overrides)
    cfg.out = cfg.out or Path(path).stem
    return cfg


# ----------------------------------------------------------------------------- model


def load_start(cfg: StageConfig, run_root: Path):
    """(model, processor) the stage starts from: the previous stage's saved model, or a fresh variant."""
    import keye.models  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from keye.models import build_model
    from keye.processing import load_nano_processor

    if cfg.init_from:
        src = run_root / cfg.init_from / MODEL_DIR
        if not (src / "config.json").is_file():
            raise ConfigError(f"init_from: {src} holds no saved model (did the previous stage finish?)")
        model = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32)
        processor = AutoProcessor.from_pretrained(src)
    else:
        torch.manual_seed(cfg.run.seed)
        model = build_model(cfg.model)
        processor = load_nano_processor()
    if cfg.rope_theta:
        set_rope_theta(model, cfg.rope_theta)
    return model, processor


def set_rope_theta(model, theta: float) -> None:
    """Context extension by raising the decoder's RoPE base (Keye-VL-1.5 stage 3 / Qwen long-context
    recipe); positions keep their meaning, rotations slow down, so longer sequences stay in range."""
    text = model.config.text_config
    text.rope_parameters = {**text.rope_parameters, "rope_theta": float(theta)}
    rotary = model.model.rotary_emb.rotary
    inv_freq, scaling = rotary.compute_default_rope_parameters(text, device=rotary.inv_freq.device)
    rotary.inv_freq.copy_(inv_freq)
    rotary.original_inv_freq = inv_freq.clone()
    rotary.attention_scaling = scaling


def apply_lora(model, lora: LoraSettings):
    """Wrap with peft LoRA; base weights freeze, adapters train (``apply_freeze_plan`` keeps ``lora_``)."""
    if not lora.enabled:
        return model
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
        target_modules=lora.target_modules or None,
        target_parameters=lora.target_parameters or None,
    )
    return get_peft_model(model, config)


def save_model(model, processor, out_dir: Path) -> Path:
    """``save_pretrained`` into ``out_dir/model`` through a temporary folder, so a crash never leaves a
    half-written model where the next stage would load it. LoRA adapters are merged first.

    Under torchrun every rank calls it: sharded (FSDP2) weights are gathered on all ranks, rank 0 writes,
    and the others wait until the folder is in place (the next stage loads it on every rank)."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    # sharded weights: a collective, every rank gathers and rank 0 writes; otherwise save_pretrained reads
    # the model itself (no full CPU copy on every rank)
    state = gathered_state_dict(model) if has_sharded_weights(model) else None
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    final, tmp = out_dir / MODEL_DIR, out_dir / f".{MODEL_DIR}.tmp"
    if not distributed or torch.distributed.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=state)
        processor.save_pretrained(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    if distributed:
        torch.distributed.barrier()
    return final


# ----------------------------------------------------------------------------- data


def read_rows(paths: list[str], run_root: Path) -> tuple[list[dict], Path]:
    """Rows of the stage's jsonl files (relative to the run folder); returns them and their folder."""
    if not paths:
        raise ConfigError("data.train: the stage lists no data files")
    rows: list[dict] = []
    for rel in paths:
        path = run_root / rel
        if not path.is_file():
            raise ConfigError(f"data.train: {path} not found")
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows, (run_root / paths[0]).parent


class LMDataset:
    """Rows -> ``Sample``s, built lazily and skipped (counted) when a video cannot be read."""

    def __init__(self, rows: list[dict], builder: SampleBuilder, max_length: int | None = None):
        self.rows, self.builder, self.max_length = rows, builder, max_length
        self.safe = SkipBadSamples(rows, self._load)

    def _load(self, row: dict):
        sample = self.builder(row)
        if self.max_length and len(sample.input_ids) > self.max_length:
            raise KeyeInputError(f"row {row.get('id')!r}: {len(sample.input_ids)} tokens > max_length {self.max_length}")
        return sample

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int):
        return self.safe[index]

    @property
    def skipped(self):
        """Skipped samples by reason (counted in the DataLoader workers too, see the runner)."""
        return self.safe.skipped

    @property
    def errors(self) -> list[str]:
        return self.safe.errors

    @property
    def keep_errors(self) -> int:
        return self.safe.keep_errors


def lm_loss_fn(model: nn.Module, batch: dict[str, torch.Tensor]) -> StepLoss:
    """Summed assistant-token cross-entropy; the MoE router losses ride along as ``aux_loss``."""
    out = model(**batch, num_items_in_batch=1, sparse_logits=True)  # sum over label tokens; head only there
    aux = out.loss - out.lm_loss if out.loss is not out.lm_loss else None
    metrics = {"router_aux": float(out.aux_loss.detach())} if out.aux_loss is not None else {}
    return StepLoss(loss_sum=out.lm_loss, aux_loss=aux, metrics=metrics)


def lm_collate(processor, cfg: StageConfig | None = None):
    """Samples -> one padded row each, or packed rows when ``cfg.packing`` (rows of ``cfg.max_length``)."""
    pad_id = processor.tokenizer.pad_token_id
    if cfg is not None and cfg.packing:
        if not cfg.max_length:
            raise ConfigError("packing: true needs max_length, the length of a packed row")
        return functools.partial(collate_packed, pad_id=pad_id, pack_length=cfg.max_length)
    return functools.partial(collate, pad_id=pad_id)


def prepare(cfg: StageConfig, run_root: Path) -> tuple[Any, Any, Path]:
    """Start model + processor, freeze plan and LoRA applied, the stage folder created with its config."""
    out_dir = run_root / cfg.out
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir)
    model, processor = load_start(cfg, run_root)
    counts = apply_freeze_plan(model, cfg.train)
    if cfg.lora.enabled:  # only the adapters train; the groups' base weights stay frozen
        model = apply_lora(model, cfg.lora)
        counts = apply_freeze_plan(model, [])
    log.info("%s: trainable parameters %s", cfg.out, counts)
    return model, processor, out_dir


def stage_main(argv: list[str] | None, prog: str, description: str | None) -> int:
    """``python -m keye.train.<family> STAGE.yaml [--run-root DIR] [key=value ...]``."""
    import argparse

    from keye.train.recipe import run_stage

    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="a stage YAML file")
    parser.add_argument("--run-root", default="runs/nano", help="folder the stage's relative paths are read from")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. run.steps=10")
    # intermixed: overrides may come before or after --run-root
    args = parser.parse_intermixed_args(argv)
    run_stage(load_stage_config(args.config, args.overrides), Path(args.run_root))
    return 0


__all__ = [
    "DataConfig", "LMDataset", "LoraSettings", "StageConfig", "apply_lora", "count_label_tokens", "lm_collate",
    "lm_loss_fn", "load_stage_config", "load_start", "prepare", "read_rows", "save_model", "set_rope_theta", "stage_main",
]
