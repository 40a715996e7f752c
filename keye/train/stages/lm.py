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

**Grounded attention** (``grounding``). Over text, the nano decoder looks an object up by a head that carries
the question's key word to the answer position and one that reads the object where the listing names it
(``keye.train.stages.text``). Over video the second read has to land on the visual tokens that show the
object, and unaided it does not: colour words are 86% right in the model's own frame listings while colour
questions stay near 49% (model card). ``grounding.weight`` > 0 adds minus the log of one head's attention,
at each answer's position, on the visual tokens whose cells overlap the boxes of the objects its question
names ("the triangle", "the red circle"; ``keye.data.world.grounding``), averaged over the batch's answers.
The boxes come from the rows of the same clip that carry ``frame_boxes`` (the world's ``frames.jsonl``).
``grounding.mentions`` > 0 does the same for the two reads a motion or entry question turns on, as the text
base's mention heads do over listings: at its answer, one head of ``mention_layer`` on the object's tokens in
the first sampled frame that shows it, the other on those of the last. ``grounding.subject`` > 0 shapes one
head at the position before an assistant turn's first word that names its question's object (a chain's "The
only triangle ..."): its attention on the question's words that name it, the read the text base's key-word
head makes for answers. It reads text alone, so it needs no ``frame_boxes``.

**Listing words that repeat** (``listing_repeat_labels``). In a frame listing most words are the object's
words in the frame before, so a decoder learns to copy them, and then copies a cell after a move too (the
model card's perception split). Below 1, only that share of the repeated words keep their labels (drawn per
row, the same draw every epoch); an object's first listed words and the cells that change keep theirs.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import random
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from keye.data.collate import SampleBuilder, collate, collate_packed, count_label_tokens
from keye.data.conversations import SkipBadSamples
from keye.data.modes import assign_modes
from keye.data.world.grounding import Grounding, grounding_targets, subject_targets
from keye.data.world.scene import COLORS, SHAPES
from keye.data.world.words import listing_mentions, scored_words
from keye.errors import ConfigError, KeyeInputError
from keye.train.attention import AttentionTap, attention_on
from keye.train.base import DataConfig, LoraSettings, StageConfig, prepare, read_rows, register_stage, save_model
from keye.train.runner import StepLoss, train

log = logging.getLogger(__name__)


@dataclass
class LMDataConfig(DataConfig):
    modes: dict[str, float] = field(default_factory=dict)  # mode mixture (keye.data.modes); empty: rows as written
    seed: int = 0  # of the mode draw


@dataclass
class GroundingConfig:
    """Grounded attention (module docstring): the loss weight (0: off) and the decoder layer and head it shapes."""

    weight: float = 0.0
    layer: int = 1
    head: int = 2
    # a motion / entry answer attending to its object's tokens in the first and in the last frame that shows it
    mentions: float = 0.0
    mention_layer: int = 1
    mention_heads: tuple[int, int] = (0, 1)  # (first frame, last frame)
    # an assistant turn's first word naming its question's object (a chain's "The only triangle") attending to
    # the question's words that name it; by default on the text base's key-word head, which does that read
    # for the answers over text
    subject: float = 0.0
    subject_layer: int = 0
    subject_head: int = 1
    # the terms train only the guided layers' query and key projections (``AttentionTap(detach_input=True)``):
    # the visual tokens and the layers below them are left to the LM loss
    detach: bool = False

    @property
    def heads(self) -> list[tuple[int, int]]:
        """The (layer, head) pairs that the terms which are on shape."""
        grounded = [(self.layer, self.head)] if self.weight > 0 else []
        grounded += [(self.mention_layer, h) for h in self.mention_heads] if self.mentions > 0 else []
        return grounded + ([(self.subject_layer, self.subject_head)] if self.subject > 0 else [])

    @property
    def enabled(self) -> bool:
        return bool(self.heads)

    @property
    def needs_boxes(self) -> bool:
        """Whether a term reads the visual tokens that show an object (the subject term reads text only)."""
        return self.weight > 0 or self.mentions > 0


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
    grounding: GroundingConfig = field(default_factory=GroundingConfig)
    # share of a frame listing's words that repeat the frame before (module docstring) that keep their labels;
    # 1 keeps all, below 1 the listing's loss falls on the words only the frame can give
    listing_repeat_labels: float = 1.0
    # the decoder's mRoPE layout from this stage on (``set_mrope_layout``); None keeps the start model's
    mrope_interleaved: bool | None = None

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.listing_repeat_labels <= 1.0:
            raise ConfigError(f"listing_repeat_labels: a share from 0 to 1, got {self.listing_repeat_labels}")
        if self.packing and not self.max_length:
            raise ConfigError("packing: true needs max_length, the length of a packed row")
        if len(set(self.grounding.heads)) < len(self.grounding.heads):
            raise ConfigError(f"grounding: each term needs a head of its own, got (layer, head) pairs "
                              f"{self.grounding.heads}")
        if self.packing and self.grounding.enabled:
            raise ConfigError("grounding: grounded attention reads one row per sample; it does not work "
                              "with packing: true")
        if self.loss_chunk < 0:
            raise ConfigError(f"loss_chunk: must be >= 0 (0: no chunking), got {self.loss_chunk}")


@dataclass
class AnnealConfig(LMStageConfig):
    rope_theta: float | None = None  # context extension by a larger RoPE base
    merge_seeds: list[int] = field(default_factory=list)  # one run per seed, weights averaged; empty: run.seed


class LMDataset:
    """Rows -> ``Sample``s, built lazily and skipped (counted) when a video cannot be read."""

    def __init__(self, rows: list[dict], builder: SampleBuilder, max_length: int | None = None,
                 grounder: "ObjectGrounder | None" = None, listing_repeat_labels: float = 1.0,
                 subject_words: dict[str, int] | None = None):
        self.rows, self.builder, self.max_length, self.grounder = rows, builder, max_length, grounder
        self.listing_repeat_labels, self.subject_words = listing_repeat_labels, subject_words
        self.safe = SkipBadSamples(rows, self._load)

    def _load(self, row: dict):
        sample = self.builder(row)
        if self.listing_repeat_labels < 1 and row.get("frame_texts"):
            draw = random.Random(zlib.crc32(str(row.get("id")).encode()))  # the same draw every epoch
            drop_repeated_labels(sample.labels, row["frame_texts"], row.get("frame_backgrounds"),
                                 self.builder.processor.tokenizer,
                                 lambda: draw.random() >= self.listing_repeat_labels)
        if self.max_length and len(sample.input_ids) > self.max_length:
            raise KeyeInputError(f"row {row.get('id')!r}: {len(sample.input_ids)} tokens > max_length {self.max_length}")
        if self.grounder is not None:
            sample.meta = {**sample.meta, "groundings": self.grounder(row, sample)}
        if self.subject_words:
            questions = user_texts(self.builder.messages(row)[0])
            sample.meta = {**sample.meta, "subjects": subject_targets(sample.input_ids, sample.labels, questions,
                                                                      self.subject_words)}
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


def drop_repeated_labels(labels_L: torch.Tensor, frame_texts: list, backgrounds: list[str] | None, tokenizer,
                         drop) -> int:
    """Set to -100, in place, the labels of the listing words in ``labels_L`` that repeat the frame before
    (``listing_mentions`` of ``frame_texts``, with the frames' ``backgrounds`` when the listing names them)
    for which ``drop()`` is true; returns how many. Labels whose scored words do not line up with the
    listing (another turn, a rendering that adds words) are left as they are."""
    words = [positions for positions, _ in scored_words(tokenizer, labels_L)]
    candidates = [listing_mentions(frame_texts, backgrounds)] if backgrounds is not None else []
    mentions = next((m for m in [*candidates, listing_mentions(frame_texts)] if len(m) == len(words)), None)
    if mentions is None:
        return 0
    dropped = [positions for positions, mention in zip(words, mentions) if mention == "same" and drop()]
    for positions in dropped:
        labels_L[positions] = -100
    return len(dropped)


class ObjectGrounder:
    """``(row, sample) -> [Grounding]`` for grounded attention: the answers of a single-clip row whose clip
    some row of the data gives ``frame_boxes`` for (by ``clip_id``), where every answer starts with the answer
    itself (as written or rendered bare, ``/no_think``); a row whose answers open a chain (``<think>``,
    ``<analysis>``) gets none, since its first answer token is no answer. Every other row gets none too."""

    def __init__(self, rows: list[dict], builder: SampleBuilder, video_token_id: int, merge: int):
        self.boxes = {row["clip_id"]: row["frame_boxes"] for row in rows if row.get("frame_boxes") and "clip_id" in row}
        self.builder, self.video_token_id, self.merge = builder, video_token_id, merge

    def __call__(self, row: dict, sample) -> list[Grounding]:
        boxes, grid_N3 = self.boxes.get(row.get("clip_id")), sample.vision.get("video_grid_thw")
        messages, _ = self.builder.messages(row)
        if boxes is None or grid_N3 is None or opens_chain(messages):
            return []
        videos = self.builder.vision(messages).videos
        if len(videos) != 1 or videos[0].timestamps is None:
            return []
        grids = [(h // self.merge, w // self.merge) for t, h, w in grid_N3.tolist() for _ in range(t)]
        return grounding_targets(sample.input_ids, sample.labels, user_texts(messages), self.video_token_id, grids,
                                 [float(t) for t in videos[0].timestamps], boxes)


def opens_chain(messages: list[dict]) -> bool:
    """Whether an assistant turn starts with a chain (``<think>`` or auto-think's ``<analysis>``)."""
    return any(text.lstrip().startswith(("<think>", "<analysis>")) for text in turn_texts(messages, "assistant"))


def user_texts(messages: list[dict]) -> list[str]:
    """The text of each user turn, in order (the questions the assistant turns answer)."""
    return turn_texts(messages, "user")


def turn_texts(messages: list[dict], role: str) -> list[str]:
    """The text parts of each ``role`` turn, joined, in order."""
    return [" ".join(p["text"] for p in m["content"] if p["type"] == "text") for m in messages if m["role"] == role]


def subject_word_ids(tokenizer) -> dict[str, int]:
    """Each colour and shape word that is one token after a space (as questions and chains write it) -> its id."""
    ids = {w: tokenizer.encode(" " + w, add_special_tokens=False) for w in (*COLORS, *SHAPES)}
    return {w: i[0] for w, i in ids.items() if len(i) == 1}


def lm_loss_fn(model: nn.Module, batch: dict[str, torch.Tensor], loss_chunk: int = 0,
               grounding: GroundingConfig = GroundingConfig(), taps: dict[int, AttentionTap] | None = None
               ) -> StepLoss:
    """Summed assistant-token cross-entropy (the head ``loss_chunk`` positions at a time); the MoE router
    losses and, with ``grounding`` on, the grounded-attention terms (read from ``taps``, by layer; each a mean
    over the batch's ``groundings``) ride along as ``aux_loss``."""
    groundings, subjects = batch.pop("groundings", []), batch.pop("subjects", [])
    # sum over label tokens; the head runs only there
    out = model(**batch, num_items_in_batch=1, sparse_logits=True, loss_chunk=loss_chunk)
    aux = out.loss - out.lm_loss if out.loss is not out.lm_loss else None
    metrics = {"router_aux": float(out.aux_loss.detach())} if out.aux_loss is not None else {}
    mask = batch["attention_mask"].bool()
    terms = []  # (metric, weight, value)
    if grounding.weight > 0 and groundings:
        rows = [(b, g.position, g.targets) for b, g in groundings]
        value = attention_on(taps[grounding.layer], grounding.head, mask, rows)
        terms.append(("grounding", grounding.weight, value))
    tracked = [(b, g) for b, g in groundings if g.first]
    if grounding.mentions > 0 and tracked:
        tap, (first, last) = taps[grounding.mention_layer], grounding.mention_heads
        value = (attention_on(tap, first, mask, [(b, g.position, g.first) for b, g in tracked])
                 + attention_on(tap, last, mask, [(b, g.position, g.last) for b, g in tracked])) / 2
        terms.append(("mentions", grounding.mentions, value))
    if grounding.subject > 0 and subjects:
        value = attention_on(taps[grounding.subject_layer], grounding.subject_head, mask, subjects)
        terms.append(("subject", grounding.subject, value))
    for name, weight, value in terms:
        aux = weight * value + (aux if aux is not None else 0)
        metrics[name] = float(value.detach())
    return StepLoss(loss_sum=out.lm_loss, aux_loss=aux, metrics=metrics)


def lm_collate(processor, cfg: LMStageConfig | None = None):
    """Samples -> one padded row each, or packed rows when ``cfg.packing`` (rows of ``cfg.max_length``);
    with grounding on, plus ``groundings``: (row, ``Grounding``) per grounded answer."""
    pad_id = processor.tokenizer.pad_token_id
    if cfg is not None and cfg.packing:
        return functools.partial(collate_packed, pad_id=pad_id, pack_length=cfg.max_length)
    if cfg is not None and cfg.grounding.enabled:
        return functools.partial(collate_grounded, pad_id=pad_id)
    return functools.partial(collate, pad_id=pad_id)


def collate_grounded(samples, pad_id: int) -> dict:
    batch = collate(samples, pad_id)
    batch["groundings"] = [(b, g) for b, s in enumerate(samples) for g in s.meta.get("groundings", [])]
    batch["subjects"] = [(b, pos, targets) for b, s in enumerate(samples)
                         for pos, targets in s.meta.get("subjects", [])]
    return batch


def train_lm(cfg: LMStageConfig, run_root: Path, out_dir: Path | None = None, adapt=None):
    """Next-token training on assistant turns; returns (model, processor). ``out_dir`` (default: the stage
    folder) receives checkpoints and metrics; ``adapt(model)`` changes the start model before training."""
    if cfg.mrope_interleaved is not None:
        adapt = _then(functools.partial(set_mrope_layout, interleaved=cfg.mrope_interleaved), adapt)
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
    builder = SampleBuilder(processor, cfg.video, base_dir=base)
    grounder, taps = None, {}
    if cfg.grounding.enabled:
        grounder, taps = _grounded(cfg, rows, builder, model, processor)
    words = subject_word_ids(processor.tokenizer) if cfg.grounding.subject > 0 else None
    dataset = LMDataset(rows, builder, cfg.max_length, grounder, cfg.listing_repeat_labels, words)
    loss_fn = functools.partial(lm_loss_fn, loss_chunk=cfg.loss_chunk, grounding=cfg.grounding, taps=taps)
    model = train(model, dataset, lm_collate(processor, cfg), loss_fn, count_label_tokens, cfg.run,
                  out_dir or stage_dir, desc=cfg.out)
    for tap in taps.values():
        tap.remove()
    if dataset.skipped:
        log.warning("%s: skipped samples %s; first: %s", cfg.out, dict(dataset.skipped), dataset.errors[:1])
    return model, processor


def _grounded(cfg: LMStageConfig, rows: list[dict], builder: SampleBuilder, model: nn.Module, processor
              ) -> tuple[ObjectGrounder | None, dict[int, AttentionTap]]:
    """The grounder (None when no term reads boxes) and the tapped layers, after checking the config against
    the data and the model."""
    grounder = None
    if cfg.grounding.needs_boxes:
        merge = model.config.projector_config.merge_size
        grounder = ObjectGrounder(rows, builder, processor.token_ids["<|video_pad|>"], merge)
    if grounder is not None and not grounder.boxes:
        raise ConfigError(f"grounding: grounded attention needs rows with frame_boxes (the world's frames.jsonl) "
                          f"beside the questions; none of {cfg.data.train} has them")
    text = model.config.text_config
    heads = cfg.grounding.heads
    for layer, head in heads:
        if not (0 <= layer < text.num_hidden_layers and 0 <= head < text.num_attention_heads):
            raise ConfigError(f"grounding: layer {layer}, head {head} is not in the decoder "
                              f"({text.num_hidden_layers} layers of {text.num_attention_heads} heads)")
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under LoRA, the wrapped model
    layers = sorted({layer for layer, _ in heads})
    return grounder, {layer: AttentionTap(base.model.layers[layer], cfg.grounding.detach) for layer in layers}


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


def set_mrope_layout(model, interleaved: bool) -> None:
    """Rotate visual tokens with the interleaved (Qwen3-VL) or contiguous (Keye-VL-1.5) mRoPE layout
    (``KeyeMRotaryEmbedding``). Text tokens rotate the same either way, so a decoder pretrained on text keeps
    what it learnt; the first stage that shows it video can pick the layout, and the saved config carries it."""
    model.config.mrope_interleaved = bool(interleaved)
    model.model.rotary_emb.set_layout(bool(interleaved))


def _then(first, second):
    """``first(model)`` and then ``second(model)`` when there is one."""
    def both(model):
        first(model)
        if second is not None:
            second(model)
    return both
