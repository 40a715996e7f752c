"""The ``text`` stage: pretrain the decoder on the world written as text, as Keye-VL starts from a decoder
pretrained on text (Qwen3) before any vision stage.

Each sample is a fresh clip of the stage's own world (``world``, seed ``TEXT_SEED`` unless set; never the
held-out clips of seed 0) written out by ``keye.data.world.text``: its per-frame listing and one question of
every kind the clip allows, as a chat (``mix`` adds chains of thought and captions). The loss is next-token
over the whole conversation (``loss: all``: listings too, so the decoder learns how objects move from frame to
frame) or over the assistant turns only. Only the ``lm`` group trains by default.

At the end the decoder is scored teacher-forced, exact answers, on the held-out questions of seed 0's val and
test clips answered from their listings (the text oracle), and on the lookup probe
(``keye.data.world.probes``); both go to ``eval.json`` in the stage folder, overall and per kind.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from keye.data.collate import Sample, collate, count_label_tokens
from keye.data.world import WorldConfig
from keye.data.world.generate import make_clip, questions_for_clip
from keye.data.world.probes import lookup_probe
from keye.data.world.text import TEXT_SEED, TextMix, conversation, oracle_messages, pretraining_clip
from keye.errors import ConfigError
from keye.fileio import atomic_write_text
from keye.train.base import StageConfig, prepare, register_stage, save_model
from keye.train.runner import train
from keye.train.session import RunConfig, resolve_device
from keye.train.stages.lm import lm_loss_fn

log = logging.getLogger(__name__)


@dataclass
class TextMixConfig:
    chains: float = 0.0  # share of answers written as <think>chain</think>answer
    captions: float = 0.0  # probability of a turn asking for the caption
    frames: float = 0.0  # probability of a turn asking for the frame listing in the world's cell words


@dataclass
class TextStageConfig(StageConfig):
    train: list[str] = field(default_factory=lambda: ["lm"])
    world: dict[str, Any] = field(default_factory=lambda: {"seed": TEXT_SEED})  # WorldConfig fields of the clips
    mix: TextMixConfig = field(default_factory=TextMixConfig)
    loss: Literal["all", "assistant"] = "all"
    # the held-out clips the text oracle is scored on: seed 0's, as many per split as the nano world has
    eval_clips: dict[str, int] = field(default_factory=lambda: {"val": 40, "test": 100})
    eval_lookups: int = 400  # lookup-probe questions scored at the end
    run: RunConfig = field(default_factory=lambda: RunConfig(steps=1000, micro_batch=16))

    def __post_init__(self):
        super().__post_init__()
        if self.data.train:
            raise ConfigError("data.train: the text stage reads no files; it writes its own text from the clips "
                              "of its world (world.*)")
        if int(self.world.get("seed", TEXT_SEED)) == 0:
            raise ConfigError("world.seed: 0 is the held-out world the text oracle is scored on; pick another seed")


class WorldTextDataset:
    """Sample ``i`` = pretraining clip ``i`` of ``config``'s world as a tokenised conversation (built on
    demand, the same for the same index)."""

    def __init__(self, size: int, config: WorldConfig, mix: TextMix, processor, loss: str):
        self.size, self.config, self.mix, self.processor, self.loss = size, config, mix, processor, loss

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Sample:
        clip, rng = pretraining_clip(index, self.config)
        text = self.processor.apply_chat_template(conversation(clip, rng, self.config, self.mix),
                                                  add_generation_prompt=False)
        enc = self.processor(text=[text], return_labels=self.loss == "assistant")
        ids = enc["input_ids"][0]
        return Sample(ids, enc["labels"][0] if self.loss == "assistant" else ids.clone())


@register_stage("text", TextStageConfig)
def run_text(cfg: TextStageConfig, run_root: Path) -> Path:
    model, processor, out_dir = prepare(cfg, run_root)
    world = WorldConfig.from_dict(cfg.world)
    size = cfg.data.max_samples or cfg.run.steps * cfg.run.micro_batch * cfg.run.accum_steps
    dataset = WorldTextDataset(size, world, TextMix(cfg.mix.chains, cfg.mix.captions, cfg.mix.frames), processor, cfg.loss)
    pad_id = processor.tokenizer.pad_token_id
    model = train(model, dataset, functools.partial(collate, pad_id=pad_id), lm_loss_fn, count_label_tokens, cfg.run,
                  out_dir, desc=cfg.out)
    device = resolve_device(cfg.run.device)
    results = {"text_oracle": text_oracle(model.to(device), processor, cfg.eval_clips),
               "lookup": lookup_accuracy(model, processor, cfg.eval_lookups)}
    model.cpu()
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        atomic_write_text(out_dir / "eval.json", json.dumps(results, indent=1))
    log.info("%s: text oracle %.3f, lookup %.3f (first-listed guess %.3f)", cfg.out, results["text_oracle"]["accuracy"],
             results["lookup"]["accuracy"], results["lookup"]["first_listed"])
    return save_model(model, processor, out_dir)


# ----------------------------------------------------------------------------- held-out scores


@torch.no_grad()
def teacher_forced_exact(model: nn.Module, processor, prompts: list[list[dict]], answers: list[str],
                         batch_size: int = 32) -> list[bool]:
    """Whether greedy decoding would write each answer: every answer token is the argmax at its position
    when the prompt and the answer before it are given (one forward per batch)."""
    tokenizer, device = processor.tokenizer, next(model.parameters()).device
    was_training = model.training
    model.eval()
    out: list[bool] = []
    for start in range(0, len(prompts), batch_size):
        rows = []
        for messages, answer in zip(prompts[start:start + batch_size], answers[start:start + batch_size]):
            prompt = tokenizer(processor.apply_chat_template(messages, add_generation_prompt=True),
                               add_special_tokens=False)["input_ids"]
            rows.append((prompt, tokenizer(answer, add_special_tokens=False)["input_ids"]))
        length = max(len(p) + len(a) for p, a in rows)
        ids_BL = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
        mask_BL = torch.zeros_like(ids_BL)
        for b, (p, a) in enumerate(rows):
            ids_BL[b, : len(p) + len(a)] = torch.tensor(p + a)
            mask_BL[b, : len(p) + len(a)] = 1
        predicted_BL = model(input_ids=ids_BL.to(device), attention_mask=mask_BL.to(device)).logits.argmax(-1).cpu()
        for b, (p, a) in enumerate(rows):  # position t predicts token t + 1
            out.append(predicted_BL[b, len(p) - 1 : len(p) + len(a) - 1].tolist() == a)
    model.train(was_training)
    return out


def text_oracle(model: nn.Module, processor, clips: dict[str, int]) -> dict[str, Any]:
    """Exact-answer accuracy on seed 0's held-out questions (those of its val.jsonl / test.jsonl),
    each answered from its clip's listing; overall and per kind."""
    config = WorldConfig(seed=0)
    prompts, answers, kinds = [], [], []
    for split, count in clips.items():
        for i in range(count):
            clip, rng = make_clip(config, split, f"{split}-{i:05d}")
            for qa in questions_for_clip(config, clip, rng)[0]:
                prompts.append(oracle_messages(clip, qa.question))
                answers.append(qa.answer)
                kinds.append(qa.kind)
    return _scores(teacher_forced_exact(model, processor, prompts, answers), kinds)


def lookup_accuracy(model: nn.Module, processor, n: int) -> dict[str, Any]:
    """The lookup probe's exact-answer accuracy, per kind, with the first-listed guess's beside it."""
    items = lookup_probe(n)
    right = teacher_forced_exact(model, processor, [[{"role": "user", "content": p.question}] for p in items],
                                 [p.answer for p in items])
    scores = _scores(right, [p.kind for p in items])
    scores["first_listed"] = sum(p.first_listed == p.answer for p in items) / max(len(items), 1)
    return scores


def _scores(right: list[bool], kinds: list[str]) -> dict[str, Any]:
    by_kind: dict[str, list[bool]] = collections.defaultdict(list)
    for r, k in zip(right, kinds):
        by_kind[k].append(r)
    return {"accuracy": sum(right) / max(len(right), 1), "n": len(right),
            "per_kind": {k: sum(v) / len(v) for k, v in sorted(by_kind.items())}}
