"""Freeze plans, per-group learning rates and schedules, shared by every stage.

A Keye model has three parameter groups named by the published weight layout: ``vision`` (``visual.*``),
``projector`` (``mlp_AR.*``; on the discrete path the code embeddings ``model.visual_embed_tokens.*``) and
``lm`` (the rest of ``model.*``, ``lm_head.*``), plus ``vq`` for the discrete visual
tokenizer. A stage's config lists the groups it trains and may give each its own learning rate; everything
else is frozen (``requires_grad=False``), so frozen weights never reach the optimizer.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

import torch

from keye.errors import ConfigError

log = logging.getLogger(__name__)

GROUP_PREFIXES: dict[str, tuple[str, ...]] = {
    "vision": ("visual.",),
    # what maps vision into the LM's input space: mlp_AR, or on the discrete path the code embeddings
    "projector": ("mlp_AR.", "model.visual_embed_tokens."),
    "vq": ("visual_tokenizer.",),
    "lm": ("model.", "lm_head."),
    # stage-local heads (e.g. the SigLIP towers of ViT pretraining), discarded when the stage ends
    "heads": ("siglip_head.",),
}
# peft wraps the model; strip its prefixes before matching (``base_model.model.visual...``).
_WRAPPER_PREFIXES = ("base_model.model.", "module.", "_orig_mod.")


@dataclass
class OptimConfig:
    lr: float = 1e-3
    group_lr: dict[str, float] = field(default_factory=dict)  # e.g. {vision: 1e-4}; others use lr
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 0
    schedule: str = "cosine"  # one of SCHEDULES
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0


def group_of(name: str) -> str:
    """The parameter group a (possibly wrapped) parameter name belongs to."""
    for prefix in _WRAPPER_PREFIXES:
        if name.startswith(prefix):
            name = name[len(prefix):]
    for group, prefixes in GROUP_PREFIXES.items():
        if name.startswith(prefixes):
            return group
    raise ConfigError(f"parameter {name!r} belongs to no group ({', '.join(GROUP_PREFIXES)})")


def apply_freeze_plan(model: torch.nn.Module, train: list[str]) -> dict[str, int]:
    """Train exactly the groups in ``train``; returns trainable parameter counts per group. On a
    discrete-vision model ``vision`` is dropped from the plan: no gradient passes the codes."""
    unknown = set(train) - set(GROUP_PREFIXES)
    if unknown:
        raise ConfigError(f"train: unknown group {sorted(unknown)[0]!r} (groups: {', '.join(GROUP_PREFIXES)})")
    if "vision" in train and getattr(getattr(model, "config", None), "vision_mode", "continuous") == "discrete":
        # codes are discrete: no gradient reaches the ViT, and moving it would invalidate the tokenizer
        log.info("discrete vision path: the ViT stays frozen (no gradient passes the codes)")
        train = [g for g in train if g != "vision"]
    counts = dict.fromkeys(train, 0)
    for name, param in model.named_parameters():
        # LoRA adapters (peft) train whenever present: the base weights under them follow the plan.
        trainable = "lora_" in name or group_of(name) in train
        param.requires_grad_(trainable)
        if trainable:
            group = group_of(name)
            counts[group] = counts.get(group, 0) + param.numel()
    return counts


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over trainable parameters, one param group per (group, decay) with the group's lr.

    Norm weights, biases and embeddings get no weight decay (the usual LLM practice)."""
    unknown = set(cfg.group_lr) - set(GROUP_PREFIXES)
    if unknown:
        raise ConfigError(f"optim.group_lr: unknown group {sorted(unknown)[0]!r}")
    buckets: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = param.ndim >= 2 and "embed" not in name and "norm" not in name
        buckets.setdefault((group_of(name), decay), []).append(param)
    if not buckets:
        raise ConfigError("nothing to train: the freeze plan froze every parameter")
    groups = [
        {
            "params": params,
            "lr": cfg.group_lr.get(group, cfg.lr),
            "weight_decay": cfg.weight_decay if decay else 0.0,
            "name": f"{group}{'' if decay else '.no_decay'}",
        }
        for (group, decay), params in sorted(buckets.items())
    ]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def _cosine(progress: float, min_ratio: float) -> float:
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _linear(progress: float, min_ratio: float) -> float:
    return 1 - (1 - min_ratio) * progress


def _constant(progress: float, min_ratio: float) -> float:
    return 1.0


SCHEDULES = {"cosine": _cosine, "linear": _linear, "constant": _constant}


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    """Linear warmup then the named decay to ``min_lr_ratio`` of each group's lr at ``total_steps``."""
    if cfg.schedule not in SCHEDULES:
        raise ConfigError(f"optim.schedule: {cfg.schedule!r} is not one of {sorted(SCHEDULES)}")
    decay = SCHEDULES[cfg.schedule]

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, total_steps - cfg.warmup_steps)
        return decay(min(1.0, (step - cfg.warmup_steps) / span), cfg.min_lr_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
