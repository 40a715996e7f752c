"""What every training stage shares: the base config, the stage registry, the model a stage starts from,
its data rows and its saved model.

A stage is one YAML file (``pipelines/<size>/<stage>.yaml``) whose ``stage:`` key names a registered stage;
the file is parsed strictly with that stage's own config class (a subclass of ``StageConfig``), so a key the
stage does not read is an error. Paths in it are relative to the recipe's run folder (``runs/nano`` by
default), so a recipe reads the world it generated and each stage starts from the folder the previous one
wrote (``init_from``). A finished stage leaves ``<run>/<out>/model`` (``save_pretrained`` format,
safetensors) beside its checkpoints, metrics, loss curve and resolved ``config.yaml``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from keye.config import save_config
from keye.errors import ConfigError
from keye.fileio import atomic_folder
from keye.registry import registrar
from keye.train.distributed import gathered_state_dict, has_sharded_weights
from keye.train.optim import apply_freeze_plan
from keye.train.session import RunConfig
from keye.video import VideoOptions

log = logging.getLogger(__name__)
MODEL_DIR = "model"


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # jsonl files, relative to the run folder
    max_samples: int | None = None  # use only the first N training rows


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
    """The keys every stage takes; a stage's own config class adds its keys."""

    stage: str = ""  # a registered stage name (``keye.train.stages``)
    out: str = ""  # folder under the run folder; default: the stage file's name
    model: str = "keye-nano"  # registered variant, used when init_from is empty
    # a previous stage's folder (holding model/) or a model folder, relative to the run folder, or a
    # pretrained start that ships with the package (keye.models.pretrained, e.g. keye-nano-base)
    init_from: str | None = None
    train: list[str] = field(default_factory=lambda: ["vision", "projector", "lm"])  # groups that train
    data: DataConfig = field(default_factory=DataConfig)
    video: VideoOptions = field(default_factory=VideoOptions)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self):
        self.video.validated("video")


# ----------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Stage:
    """A registered stage: its config class and ``run(cfg, run_root) -> the stage's folder``."""

    name: str
    config: type[StageConfig]
    run: Callable[[Any, Path], Path]


STAGES: dict[str, Stage] = {}
_file_stage = registrar(STAGES)


def register_stage(name: str, config: type[StageConfig]):
    """``@register_stage("sft", LMStageConfig)`` over a stage's ``run(cfg, run_root)`` files it by name."""

    def wrap(run: Callable[[Any, Path], Path]):
        _file_stage(name)(Stage(name, config, run))
        return run

    return wrap


# ----------------------------------------------------------------------------- model


def load_start(cfg: StageConfig, run_root: Path):
    """(model, processor) the stage starts from: the model ``init_from`` names (a stage folder holding
    ``model/``, or a model folder), or a fresh ``model`` variant seeded with ``run.seed``."""
    import keye.models  # noqa: F401  (registers the Auto classes)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from keye.models import build_model
    from keye.models.weights import weight_files
    from keye.processing import load_nano_processor

    if cfg.init_from:
        src = start_folder(run_root, cfg.init_from)
        weight_files(src)  # safetensors only, whole: a pickle-only or damaged folder is named before loading
        model = AutoModelForImageTextToText.from_pretrained(src, dtype=torch.float32, use_safetensors=True)
        return model, AutoProcessor.from_pretrained(src)
    torch.manual_seed(cfg.run.seed)
    return build_model(cfg.model), load_nano_processor()


def start_folder(run_root: Path, init_from: str) -> Path:
    """The model folder ``init_from`` names: ``<run_root>/<init_from>/model``, the folder itself when it
    holds a model (``config.json``), or else a pretrained start shipped with the package."""
    from keye.models.pretrained import PRETRAINED, pretrained_folder

    stage = run_root / init_from
    for candidate in (stage / MODEL_DIR, stage):
        if (candidate / "config.json").is_file():
            return candidate
    shipped = pretrained_folder(init_from)
    if shipped is not None:
        return shipped
    raise ConfigError(f"init_from: {stage / MODEL_DIR} holds no saved model (did the previous stage finish?), and "
                      f"{init_from!r} is no shipped pretrained start ({', '.join(PRETRAINED)})")


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


def prepare(cfg: StageConfig, run_root: Path, lora: LoraSettings | None = None,
            adapt: Callable[[nn.Module], None] | None = None, start: tuple[Any, Any] | None = None,
            ) -> tuple[Any, Any, Path]:
    """The stage's model and processor, and its folder (created, the resolved config in it).

    The model is ``start`` (model, processor) or ``load_start``'s; ``adapt(model)`` runs on it first (e.g. a
    new RoPE base, or keeping a frozen copy), then the freeze plan ``cfg.train`` and ``lora``."""
    out_dir = run_root / cfg.out
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir)
    model, processor = start if start is not None else load_start(cfg, run_root)
    if adapt is not None:
        adapt(model)
    counts = apply_freeze_plan(model, cfg.train)
    if lora is not None and lora.enabled:  # only the adapters train; the groups' base weights stay frozen
        model = apply_lora(model, lora)
        counts = apply_freeze_plan(model, [])
    log.info("%s: trainable parameters %s", cfg.out, counts)
    return model, processor, out_dir


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
    final = out_dir / MODEL_DIR
    if not distributed or torch.distributed.get_rank() == 0:
        with atomic_folder(final) as tmp:
            model.save_pretrained(tmp, state_dict=state)
            processor.save_pretrained(tmp)
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
