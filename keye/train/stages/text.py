"""The ``text`` stage: pretrain the decoder on the world written as text, as Keye-VL starts from a decoder
pretrained on text (Qwen3) before any vision stage.

Each sample is a fresh clip of the stage's own world (``world``, seed ``TEXT_SEED`` unless set; never the
held-out clips of seed 0) written out by ``keye.data.world.text``: its per-frame listing and one question of
every kind the clip allows, as a chat (``mix`` adds chains of thought, captions, the cell-word frame listing,
short colour / shape lookups over 1-3 frames, and short motion windows: which way each object of one shot
moves, over 2-4 of its frames). The loss is next-token over the whole conversation
(``loss: all``: listings too, so the decoder learns how objects move from frame to frame) or over the
assistant turns only; ``answer_weight`` adds a mean cross-entropy over the answers' tokens alone, so the few
answer tokens of a long listing are not drowned in it. Only the ``lm`` group trains by default.

**Guided attention** (``guide``). A decoder this small, trained from scratch, sits for thousands of steps on
the first-listed plateau of lookups ("What colour is the square?" answered with the listing's first colour):
no head learns to carry the question's key word to where the answer is written, so nothing can look it up.
Two auxiliary losses shape two heads of one layer into the circuit's first hop: one head attends to the
previous token (``previous_token``), the other, at each answer's position, to the key words of its question
(``key_words``: the colours, shapes, directions it names). Each is minus the log of the attention on its
target, averaged; both weights are 0 (off) by default. With them the lookup plateau breaks within a few
hundred steps (model card). A third (``mentions``) shapes two heads of a later layer into the reads a motion
question needs: at its answer position, one head on the asked object's x and y in the first listed frame that
shows it, the other on those of the last (``mention_kinds`` adds entry questions, whose answer also shows at
the object's first and last listed frames). A fourth (``order``) shapes one head so that an order question's
answer position reads the name of whichever option the listing names first. Guidance needs those heads'
attention weights: ``AttentionTap`` (``keye.train.attention``) records a layer's queries and keys as its
kernel runs and computes them for the guided heads alone, so every layer keeps the model's own attention
kernel (eager attention on all layers made whole-clip steps 50% slower; the tap costs 6%).

At the end the decoder is scored teacher-forced, exact answers, on the held-out questions of seed 0's val and
test clips answered from their listings (the text oracle), and on the lookup probe
(``keye.data.world.probes``); both go to ``eval.json`` in the stage folder, overall and per kind.
"""

from __future__ import annotations

import collections
import functools
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from keye.data.collate import Sample, collate, count_label_tokens
from keye.data.world import WorldConfig
from keye.data.world.generate import majority_shares, make_clip, questions_for_clip
from keye.data.world.grounding import MENTION_QUESTIONS
from keye.data.world.probes import lookup_probe
from keye.data.world.text import (TEXT_SEED, TextMix, Turn, conversation, key_words, lookup_turns, messages,
                                  motion_turns, oracle_messages, pretraining_clip)
from keye.errors import ConfigError
from keye.fileio import atomic_write_text
from keye.train.attention import FLOOR, AttentionTap, attention_on
from keye.train.base import StageConfig, prepare, register_stage, save_model
from keye.train.runner import StepLoss, train
from keye.train.session import RunConfig, resolve_device
from keye.train.stages.lm import lm_loss_fn

log = logging.getLogger(__name__)
MAX_REDRAWS = 100  # clips drawn for one lookup / motion sample before the world is judged unable to serve it


@dataclass
class GuideConfig:
    """Guided attention (module docstring): weights of the two auxiliary losses (0: off), and the layer and
    heads they shape."""

    previous_token: float = 0.0
    key_words: float = 0.0
    layer: int = 0
    heads: tuple[int, int] = (0, 1)  # (the previous-token head, the key-word head)
    # a motion question's answer position attending to its object's coordinates in the first listed frame
    # that shows it (one head) and in the last (the other): the two reads its direction compares
    mentions: float = 0.0
    mention_layer: int = 1
    mention_heads: tuple[int, int] = (0, 1)  # (first frame, last frame)
    # the question kinds whose answers the mention heads read for (an entry question's object too: whether it
    # is in view at its shot's ends shows in its first and last listed frames)
    mention_kinds: tuple[str, ...] = ("motion",)
    # an order question's answer position attending to the name, at its first mention in the listing, of
    # whichever of its two options is listed first: the read that "which appears first" turns on
    order: float = 0.0
    order_layer: int = 2
    order_head: int = 0

    @property
    def first_hop(self) -> bool:
        """Whether the previous-token or key-word head of ``layer`` is shaped."""
        return self.previous_token > 0 or self.key_words > 0

    @property
    def shaped_heads(self) -> dict[str, list[tuple[int, int]]]:
        """The (layer, head) pairs each term that is on shapes, by the key naming its heads."""
        terms = {"heads": ([(self.layer, h) for h in self.heads], self.first_hop),
                 "mention_heads": ([(self.mention_layer, h) for h in self.mention_heads], self.mentions > 0),
                 "order_head": ([(self.order_layer, self.order_head)], self.order > 0)}
        return {key: heads for key, (heads, on) in terms.items() if on}

    @property
    def layers(self) -> set[int]:
        """The layers whose attention some term shapes (empty: guidance off)."""
        return {layer for heads in self.shaped_heads.values() for layer, _ in heads}

    @property
    def enabled(self) -> bool:
        return bool(self.layers)


@dataclass
class TextStageConfig(StageConfig):
    train: list[str] = field(default_factory=lambda: ["lm"])
    world: dict[str, Any] = field(default_factory=lambda: {"seed": TEXT_SEED})  # WorldConfig fields of the clips
    mix: TextMix = field(default_factory=TextMix)
    loss: Literal["all", "assistant"] = "all"
    # weight of an extra mean cross-entropy over the assistant turns' tokens (0: none): a listing holds ~30x
    # more tokens than the answers about it, and the summed loss barely sees the answers
    answer_weight: float = 0.0
    guide: GuideConfig = field(default_factory=GuideConfig)
    # the held-out clips the text oracle is scored on: seed 0's, as many per split as the nano world has
    eval_clips: dict[str, int] = field(default_factory=lambda: {"val": 40, "test": 100})
    eval_lookups: int = 400  # lookup-probe questions scored at the end
    run: RunConfig = field(default_factory=lambda: RunConfig(steps=1000, micro_batch=16))

    def __post_init__(self):
        super().__post_init__()
        g = self.guide
        shaped_by: dict[tuple[int, int], str] = {}
        for key, heads in g.shaped_heads.items():
            for layer, head in heads:
                if (layer, head) in shaped_by and shaped_by[layer, head] != key:
                    raise ConfigError(f"guide.{key}: head {head} of layer {layer} is shaped by another guide term "
                                      f"already (guide.{shaped_by[layer, head]}); give it another head or layer")
                shaped_by[layer, head] = key
        if unknown := set(g.mention_kinds) - set(MENTION_QUESTIONS):
            raise ConfigError(f"guide.mention_kinds: {sorted(unknown)} unknown; the mention heads read for "
                              f"{sorted(MENTION_QUESTIONS)}")
        if self.data.train:
            raise ConfigError("data.train: the text stage reads no files; it writes its own text from the clips "
                              "of its world (world.*)")
        if self.mix.lookups + self.mix.motions > 1:
            raise ConfigError(f"mix.lookups + mix.motions: {self.mix.lookups} + {self.mix.motions} is over 1; they are "
                              f"shares of the samples, the rest whole clips")
        if int(self.world.get("seed", TEXT_SEED)) == 0:
            raise ConfigError("world.seed: 0 is the held-out world the text oracle is scored on; pick another seed")


class WorldTextDataset:
    """Sample ``i`` = pretraining clip ``i`` of ``config``'s world as a tokenised conversation (built on
    demand, the same for the same index): a whole clip, or with probability ``mix.lookups`` lookups over a
    window of it (of another clip when it never shows two objects at once), or with probability
    ``mix.motions`` the motions of one of its shots. ``meta["guides"]`` lists, per
    answer, (the position that predicts its first token, the positions of its question's key words)."""

    def __init__(self, size: int, config: WorldConfig, mix: TextMix, processor, loss: str,
                 mention_kinds: tuple[str, ...] = ("motion",)):
        self.size, self.config, self.mix, self.processor, self.loss = size, config, mix, processor, loss
        self.mention_kinds = mention_kinds

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> Sample:
        clip, rng = pretraining_clip(index, self.config)
        draw = rng.random()
        if draw < self.mix.lookups:
            turns = self._redrawn(index, clip, rng, functools.partial(lookup_turns, cells=self.mix.cells),
                                  "never show two objects at once, so no lookup can be asked; lower mix.lookups "
                                  "or allow more objects")
        elif draw < self.mix.lookups + self.mix.motions:
            turns = self._redrawn(index, clip, rng, motion_turns, "never show an object in two frames of a shot; "
                                  "lower mix.motions")
        else:
            turns = conversation(clip, rng, self.config, self.mix)
        text = self.processor.apply_chat_template(messages(turns), add_generation_prompt=False)
        enc = self.processor(text=[text], return_labels=True)
        ids, answers = enc["input_ids"][0], enc["labels"][0]
        labels = answers if self.loss == "assistant" else ids.clone()
        guides, mentions, orders = guide_positions(self.processor.tokenizer, text, turns, self.mention_kinds)
        return Sample(ids, labels, meta={"guides": guides, "mentions": mentions, "orders": orders,
                                         "answer_labels": answers})

    def _redrawn(self, index: int, clip, rng, make_turns, why: str) -> list[Turn]:
        """``make_turns(clip, rng)``, on other clips in its place while it asks nothing (a lookup needs two
        objects in view at once, which about 1 clip in 5 never shows)."""
        turns, redraw = make_turns(clip, rng), 0
        while not turns:
            redraw += 1
            if redraw > MAX_REDRAWS:
                raise ConfigError(f"world {self.config}: {MAX_REDRAWS} clips in a row {why}")
            clip, rng = pretraining_clip(index, self.config, redraw)
            turns = make_turns(clip, rng)
        return turns


_ORDER_QUESTION = re.compile(r"Which appears first in the video\?\nA\. the (\w+ \w+)\nB\. the (\w+ \w+)")


def guide_positions(tokenizer, text: str, turns: list[Turn], mention_kinds: tuple[str, ...] = ("motion",)
                    ) -> tuple[list[tuple[int, list[int]]], list[tuple[int, list[int], list[int]]],
                               list[tuple[int, list[int]]]]:
    """In the tokenisation of ``text`` (the rendered chat of ``turns``): per turn with key words, the token
    position whose next-token prediction is the answer's first token and the positions of its question's
    key words; per question of ``mention_kinds`` whose object the listing before it names in two frames or
    more, that answer position and the positions of the object's x and y in the first and in the last of
    them; per order question whose two options the listing names, that answer position and the positions of
    the colour and shape words of the option listed first, where it is first listed."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    starts = [start for start, _ in offsets]

    def token_at(char: int) -> int:  # the token whose span starts at or before ``char``
        return max(i for i, s in enumerate(starts) if s <= char)

    guides, mentions, orders, cursor = [], [], [], 0
    asks = [MENTION_QUESTIONS[kind] for kind in mention_kinds]
    for turn in turns:
        q = text.index(turn.question, cursor)
        a = text.index(turn.answer, q + len(turn.question)) if turn.answer else q + len(turn.question)
        cursor = a + len(turn.answer)
        words = set(key_words(turn.question))
        keys = [token_at(q + m.start()) for m in re.finditer(r"[a-z]+", turn.question) if m.group(0) in words]
        if keys:
            guides.append((token_at(a) - 1, sorted(set(keys))))
        asked = next((m for ask in asks if (m := ask.match(turn.question))), None)
        seen = list(re.finditer(rf"\b{asked.group(1)} (\d+) (\d+)", text[:q])) if asked else []
        if len(seen) >= 2:
            first, last = ([token_at(m.start(i)) for i in (1, 2)] for m in (seen[0], seen[-1]))
            mentions.append((token_at(a) - 1, first, last))
        options = _ORDER_QUESTION.match(turn.question)
        listed = [re.search(rf"\b({colour}) ({shape}) \d+ \d+", text[:q])
                  for colour, shape in (name.split() for name in options.groups())] if options else []
        if listed and all(listed):
            earlier = min(listed, key=lambda m: m.start())
            orders.append((token_at(a) - 1, [token_at(earlier.start(1)), token_at(earlier.start(2))]))
    return guides, mentions, orders


def collate_guided(samples: list[Sample], pad_id: int) -> dict:
    """``collate`` plus ``guides`` ((row, answer position, key positions) for every guided answer),
    ``mentions`` ((row, answer position, first frame's positions, last frame's) for every motion question),
    ``orders`` ((row, answer position, the first-listed option's name positions) for every order question)
    and ``answer_labels`` (B, L): the labels of the assistant turns alone, -100 elsewhere."""
    batch = collate(samples, pad_id)
    batch["guides"] = [(b, pos, keys) for b, s in enumerate(samples) for pos, keys in s.meta.get("guides", [])]
    batch["mentions"] = [(b, *m) for b, s in enumerate(samples) for m in s.meta.get("mentions", [])]
    batch["orders"] = [(b, *o) for b, s in enumerate(samples) for o in s.meta.get("orders", [])]
    batch["answer_labels"] = torch.full_like(batch["labels"], -100)
    for b, s in enumerate(samples):
        answers = s.meta["answer_labels"]
        batch["answer_labels"][b, : len(answers)] = answers
    return batch


def text_loss(model: nn.Module, batch: dict, answer_weight: float = 0.0, guide: GuideConfig = GuideConfig(),
              taps: dict[int, AttentionTap] | None = None) -> StepLoss:
    """The summed LM loss; as ``aux_loss`` (means): the MoE router terms, ``answer_weight`` times the answers'
    mean cross-entropy, and the guidance terms, read from ``taps`` (one per guided layer). Their values go to
    the metrics."""
    guides, mentions, orders = batch.pop("guides"), batch.pop("mentions", []), batch.pop("orders", [])
    answer_labels_BL = batch.pop("answer_labels")
    if answer_weight <= 0 and not guide.enabled:
        return lm_loss_fn(model, batch)
    out = model(**batch, num_items_in_batch=1)  # full logits: the answers' loss is read from them too
    terms = [out.loss - out.lm_loss] if out.loss is not out.lm_loss else []
    metrics = {"router_aux": float(out.aux_loss.detach())} if out.aux_loss is not None else {}

    def add(name: str, weight: float, value: torch.Tensor) -> None:
        terms.append(weight * value)
        metrics[name] = float(value.detach())

    if answer_weight > 0:
        targets_BL = answer_labels_BL[:, 1:]
        picked = targets_BL != -100
        add("answer_loss", answer_weight,
            torch.nn.functional.cross_entropy(out.logits[:, :-1][picked].float(), targets_BL[picked]))
    mask_BL = batch["attention_mask"].bool()
    if guide.previous_token > 0:  # row t's attention on t - 1, over the real tokens after the first
        log_BLL = taps[guide.layer].log_attention(guide.heads[0], mask_BL)
        log_prev_BL1 = torch.diagonal(log_BLL, offset=-1, dim1=-2, dim2=-1)
        add("guide_previous", guide.previous_token, -log_prev_BL1.clamp_min(FLOOR)[mask_BL[:, 1:]].mean())
    if guide.key_words > 0 and guides:  # each answer position's summed attention on its question's key words
        add("guide_keys", guide.key_words, attention_on(taps[guide.layer], guide.heads[1], mask_BL, guides))
    if guide.mentions > 0 and mentions:  # a motion answer's attention on its object's first / last coordinates
        tap = taps[guide.mention_layer]
        first = attention_on(tap, guide.mention_heads[0], mask_BL, [(b, pos, f) for b, pos, f, _ in mentions])
        last = attention_on(tap, guide.mention_heads[1], mask_BL, [(b, pos, la) for b, pos, _, la in mentions])
        add("guide_mentions", guide.mentions, (first + last) / 2)
    if guide.order > 0 and orders:  # an order answer's attention on the name of the option listed first
        add("guide_order", guide.order, attention_on(taps[guide.order_layer], guide.order_head, mask_BL, orders))
    return StepLoss(out.lm_loss, sum(terms) if terms else None, metrics)


@register_stage("text", TextStageConfig)
def run_text(cfg: TextStageConfig, run_root: Path) -> Path:
    model, processor, out_dir = prepare(cfg, run_root)
    world = WorldConfig.from_dict(cfg.world)
    size = cfg.data.max_samples or cfg.run.steps * cfg.run.micro_batch * cfg.run.accum_steps
    dataset = WorldTextDataset(size, world, cfg.mix, processor, cfg.loss, tuple(cfg.guide.mention_kinds))
    collate_fn = functools.partial(collate_guided, pad_id=processor.tokenizer.pad_token_id)
    taps = {layer: AttentionTap(model.model.layers[layer]) for layer in sorted(cfg.guide.layers)}
    loss_fn = functools.partial(text_loss, answer_weight=cfg.answer_weight, guide=cfg.guide, taps=taps)
    model = train(model, dataset, collate_fn, loss_fn, count_label_tokens, cfg.run, out_dir, desc=cfg.out,
                  evaluate=functools.partial(held_out_figures, processor=processor, cfg=cfg))
    for tap in taps.values():
        tap.remove()
    device = resolve_device(cfg.run.device)
    results = held_out_scores(model.to(device), processor, cfg)
    model.cpu()
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        atomic_write_text(out_dir / "eval.json", json.dumps(results, indent=1))
    log.info("%s: text oracle %.3f, lookup %.3f (first-listed guess %.3f)", cfg.out, results["text_oracle"]["accuracy"],
             results["lookup"]["accuracy"], results["lookup"]["first_listed"])
    return save_model(model, processor, out_dir)


# ----------------------------------------------------------------------------- held-out scores


def held_out_scores(model: nn.Module, processor, cfg: TextStageConfig) -> dict[str, Any]:
    """The text oracle on ``cfg.eval_clips`` and the lookup probe, as ``eval.json`` holds them."""
    return {"text_oracle": text_oracle(model, processor, cfg.eval_clips),
            "lookup": lookup_accuracy(model, processor, cfg.eval_lookups)}


def held_out_figures(model: nn.Module, processor, cfg: TextStageConfig) -> dict[str, float]:
    """``held_out_scores`` flattened for the metrics log (``run.eval_every``): the overall figures, and
    the text oracle per kind as ``text_oracle/<kind>``."""
    scores = held_out_scores(model, processor, cfg)
    oracle = scores["text_oracle"]
    return {"text_oracle": oracle["accuracy"], "text_oracle_direct": oracle["direct"]["accuracy"],
            "lookup": scores["lookup"]["accuracy"],
            **{f"text_oracle/{kind}": value for kind, value in oracle["per_kind"].items()}}


@torch.no_grad()
def teacher_forced_exact(model: nn.Module, processor, prompts: list[list[dict]], answers: list[str],
                         batch_size: int = 32) -> list[bool]:
    """Whether greedy decoding would write each answer: every answer token is the argmax at its position
    when the prompt and the answer before it are given (one forward per batch)."""
    return [exact for exact, _, _ in _teacher_forced(model, processor, prompts, answers, batch_size)]


@torch.no_grad()
def _teacher_forced(model: nn.Module, processor, prompts: list[list[dict]], answers: list[str], batch_size: int = 32
                    ) -> list[tuple[bool, bool, bool]]:
    """Per answer: (exact, as ``teacher_forced_exact``; exact once ``<think>`` is barred from the first
    position, i.e. the answer a direct reply would give; whether ``<think>`` is the first argmax)."""
    tokenizer, device = processor.tokenizer, next(model.parameters()).device
    think = tokenizer.convert_tokens_to_ids("<think>")
    was_training = model.training
    model.eval()
    out: list[tuple[bool, bool, bool]] = []
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
        logits_BLV = model(input_ids=ids_BL.to(device), attention_mask=mask_BL.to(device)).logits
        predicted_BL = logits_BLV.argmax(-1).cpu()
        for b, (p, a) in enumerate(rows):  # position t predicts token t + 1
            predicted = predicted_BL[b, len(p) - 1 : len(p) + len(a) - 1].tolist()
            best, second = logits_BLV[b, len(p) - 1].topk(2).indices.tolist()
            direct = [second if best == think else best] + predicted[1:]
            out.append((predicted == a, direct == a, predicted[0] == think))
    model.train(was_training)
    return out


def text_oracle(model: nn.Module, processor, clips: dict[str, int]) -> dict[str, Any]:
    """Exact-answer accuracy on seed 0's held-out questions (those of its val.jsonl / test.jsonl),
    each answered from its clip's listing; overall and per kind. A decoder that saw some answers written as
    chains may open one (``<think>``) where the answer should start, which exact scoring counts as wrong:
    ``direct`` is the accuracy with ``<think>`` barred from the first position (what it knows when made to
    answer), ``opens_chain`` the share of questions where ``<think>`` is the first argmax, ``majority`` per kind
    the share its most common answer would get."""
    config = WorldConfig(seed=0)
    prompts, answers, kinds = [], [], []
    for split, count in clips.items():
        for i in range(count):
            clip, rng = make_clip(config, split, f"{split}-{i:05d}")
            for qa in questions_for_clip(config, clip, rng)[0]:
                prompts.append(oracle_messages(clip, qa.question))
                answers.append(qa.answer)
                kinds.append(qa.kind)
    results = _teacher_forced(model, processor, prompts, answers)
    scores = _scores([exact for exact, _, _ in results], kinds)
    direct = _scores([d for _, d, _ in results], kinds)
    chains = _scores([c for _, _, c in results], kinds)
    return {**scores, "direct": {"accuracy": direct["accuracy"], "per_kind": direct["per_kind"]},
            "opens_chain": {"share": chains["accuracy"], "per_kind": chains["per_kind"]},
            "majority": {kind: share for kind, (share, _) in
                         majority_shares([{"kind": k, "answer": a} for k, a in zip(kinds, answers)]).items()}}


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
