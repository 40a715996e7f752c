"""The next-token stages of Keye-VL-1.5 (report sec. 3-4): one loop, four registered stages.

* ``align`` (stage 1): projector alignment; ViT and LM frozen, ``mlp_AR`` learns to map visual features
  into the LM's input space, on captions.
* ``multitask`` (stage 2): everything trains on captions and question answering.
* ``anneal`` (stage 3): a short, low-LR pass over higher-quality data with a larger RoPE base (context
  extension), run once per seed in ``merge_seeds`` and averaged into one model (model soup; the report
  merges models trained on different data mixtures).
* ``sft``: cold-start SFT with the five modes (report sec. 4.1): thinking, non-thinking, auto-think,
  think-with-image and video. Each row is rendered in one mode drawn from ``data.modes`` among the modes
  that fit it (``keye.data.modes.assign_modes``: stable per row id, so the mixture does not shift when
  data is added); the mode decides the assistant text (``<think>``, ``<analysis>``) and the ``/think`` /
  ``/no_think`` suffix. Any stage may set ``data.modes`` (the anneal renders half its rows as chains).

The loss is summed over assistant tokens only and normalised by the runner over the accumulation window.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from keye.data.collate import SampleBuilder, collate, collate_packed, count_label_tokens
from keye.data.conversations import SkipBadSamples
from keye.data.modes import assign_modes
from keye.errors import ConfigError, KeyeInputError
from keye.train.base import DataConfig, LoraSettings, StageConfig, prepare, read_rows, register_stage, save_model
from keye.train.runner import StepLoss, train

log = logging.getLogger(__name__)


@dataclass
class LMDataConfig(DataConfig):
    modes: dict[str, float] = field(default_factory=dict)  # mode mixture (keye.data.modes); empty: rows as written
    seed: int = 0  # of the mode draw


@dataclass
class LMStageConfig(StageConfig):
    data: LMDataConfig = field(default_factory=LMDataConfig)
    lora: LoraSettings = field(default_factory=LoraSettings)
    max_length: int | None = None  # drop longer samples (counted); None keeps all
    # pack each micro-batch's samples into rows of max_length tokens (needs max_length), with per-sample
    # positions and attention (keye.data.packing); run.micro_batch still counts samples
    packing: bool = False
    # the LM head and its loss this many label positions at a time (keye.models.losses.head_cross_entropy):
    # memory O(loss_chunk x vocab) instead of O(labels x vocab); 0 takes all positions at once
    loss_chunk: int = 4096

    def __post_init__(self):
        super().__post_init__()
        if self.packing and not self.max_length:
            raise ConfigError("packing: true needs max_length, the length of a packed row")
        if self.loss_chunk < 0:
            raise ConfigError(f"loss_chunk: must be >= 0 (0: no chunking), got {self.loss_chunk}")


@dataclass
class AnnealConfig(LMStageConfig):
    rope_theta: float | None = None  # context extension by a larger RoPE base
    merge_seeds: list[int] = field(default_factory=list)  # one run per seed, weights averaged; empty: run.seed


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


def lm_loss_fn(model: nn.Module, batch: dict[str, torch.Tensor], loss_chunk: int = 0) -> StepLoss:
    """Summed assistant-token cross-entropy (the head ``loss_chunk`` positions at a time); the MoE router
    losses ride along as ``aux_loss``."""
    # sum over label tokens; the head runs only there
    out = model(**batch, num_items_in_batch=1, sparse_logits=True, loss_chunk=loss_chunk)
    aux = out.loss - out.lm_loss if out.loss is not out.lm_loss else None
    metrics = {"router_aux": float(out.aux_loss.detach())} if out.aux_loss is not None else {}
    return StepLoss(loss_sum=out.lm_loss, aux_loss=aux, metrics=metrics)


def lm_collate(processor, cfg: LMStageConfig | None = None):
    """Samples -> one padded row each, or packed rows when ``cfg.packing`` (rows of ``cfg.max_length``)."""
    pad_id = processor.tokenizer.pad_token_id
    if cfg is not None and cfg.packing:
        return functools.partial(collate_packed, pad_id=pad_id, pack_length=cfg.max_length)
    return functools.partial(collate, pad_id=pad_id)


def train_lm(cfg: LMStageConfig, run_root: Path, out_dir: Path | None = None, adapt=None):
    """Next-token training on assistant turns; returns (model, processor). ``out_dir`` (default: the stage
    folder) receives checkpoints and metrics; ``adapt(model)`` changes the start model before training."""
    model, processor, stage_dir = prepare(cfg, run_root, cfg.lora, adapt)
    rows, base = read_rows(cfg.data.train, run_root)
    if cfg.data.modes:
        rendered = assign_modes(rows, cfg.data.modes, seed=cfg.data.seed)
        if len(rendered) < len(rows):
            log.warning("%s: %d of %d rows fit none of the modes %s (the answer styles need a single-turn row with "
                        "an 'answer'; video, a video) and are left out", cfg.out, len(rows) - len(rendered), len(rows),
                        sorted(m for m, w in cfg.data.modes.items() if w > 0))
        rows = rendered
        log.info("%s: %d rows by mode %s", cfg.out, len(rows), dict(collections.Counter(r.get("mode") for r in rows)))
    if cfg.data.max_samples:
        rows = rows[: cfg.data.max_samples]
    dataset = LMDataset(rows, SampleBuilder(processor, cfg.video, base_dir=base), cfg.max_length)
    loss_fn = functools.partial(lm_loss_fn, loss_chunk=cfg.loss_chunk)
    model = train(model, dataset, lm_collate(processor, cfg), loss_fn, count_label_tokens, cfg.run,
                  out_dir or stage_dir, desc=cfg.out)
    if dataset.skipped:
        log.warning("%s: skipped samples %s; first: %s", cfg.out, dict(dataset.skipped), dataset.errors[:1])
    return model, processor


@register_stage("align", LMStageConfig)
@register_stage("multitask", LMStageConfig)
@register_stage("sft", LMStageConfig)
def run_lm(cfg: LMStageConfig, run_root: Path) -> Path:
    model, processor = train_lm(cfg, run_root)
    return save_model(model, processor, run_root / cfg.out)


@register_stage("anneal", AnnealConfig)
def run_anneal(cfg: AnnealConfig, run_root: Path) -> Path:
    """Train once per seed from the same start, then average the weights (uniform model soup)."""
    seeds = cfg.merge_seeds or [cfg.run.seed]
    adapt = functools.partial(set_rope_theta, theta=cfg.rope_theta) if cfg.rope_theta else None
    merged: dict[str, torch.Tensor] = {}
    for seed in seeds:
        seed_cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, seed=seed))
        model, processor = train_lm(seed_cfg, run_root, out_dir=run_root / cfg.out / f"seed_{seed}", adapt=adapt)
        for key, value in model.state_dict().items():
            merged[key] = merged.get(key, 0) + value.detach().float() / len(seeds)
    model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in merged.items()})
    return save_model(model, processor, run_root / cfg.out)


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
