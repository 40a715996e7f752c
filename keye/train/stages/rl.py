"""The RL stage of Keye-VL-1.5 (report sec. 4.3): GSPO on video prompts with progressive hint sampling.

One step of the loop, top to bottom:

1. **Rollouts.** ``rollout.prompts_per_step`` prompts (video questions, Slow-Fast frames included) are
   drawn in a seeded order; each is sampled ``rollout.group_size`` (G) times with the model's own
   ``generate()``, all prompts and samples in one batch.
2. **Rewards.** Registered plain functions ``f(prompts, completions, **row)`` (``keye.train.rewards``),
   weighted by ``rewards``: answer correctness, output format for the row's think mode, repetition.
3. **Progressive hints** (Keye-VL-1.5): a prompt whose G answers are all wrong is sampled again with
   hint levels 1, 2, ... appended (observation, strategy, tool/formula, first step, full solution;
   the rows carry them, ``keye.data.modes.with_hint``). The lowest level at which some answer is
   correct replaces the group, hinted prompt included, so the update learns from a solvable prompt.
4. **Zero-variance groups** (all rewards equal, hence all advantages 0) carry no signal: filtered, or
   replaced by freshly drawn prompts (``zero_variance: resample``, DAPO's dynamic sampling).
5. **Update.** Group-normalised advantages; the completions' log-probs under the rollout policy are
   kept as pi_old; the rollout batch is split into minibatches of ``minibatch_size`` sequences, one
   optimizer step each, ``epochs`` passes. The policy loss is a registered function
   (``keye.train.rl_losses``: ``gspo`` by default, ``gspo_token``, ``grpo``), sequence-mean
   aggregated; KL to the starting policy only when ``loss.beta > 0``; the MoE router loss rides along.

The run's lifecycle is the shared ``TrainSession``: a step's checkpoint holds weights, optimizer, schedule,
RNG and the data position, so a resumed run samples exactly the rollouts the uninterrupted run would have.
At the end the policy is saved to ``<run_root>/<out>/model`` like every other stage, and, when ``data.eval``
lists held-out rows, greedy accuracy (overall and per kind), format pass rate and how many of the chains'
placement claims the clips' frame listings confirm go to ``eval.json``, and every answer to
``eval_answers.jsonl`` (``run.steps=0`` measures the starting checkpoint the same way).

Run: ``keye train pipelines/nano/rl.yaml [--run-root runs/nano] [key=value ...]``, or as a stage of a recipe.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from keye.data.answers import is_correct
from keye.data.collate import SampleBuilder
from keye.data.modes import assign_modes, with_hint
from keye.data.world.generate import WorldConfig, clips_of_rows, frame_texts
from keye.data.world.words import confirmed_claims
from keye.errors import ConfigError
from keye.fileio import atomic_write_text
from keye.processing import FAST_END, FAST_START, FRAME, IMAGE_PAD, VIDEO_PAD
from keye.train.base import DataConfig, LoraSettings, StageConfig, prepare, read_rows, register_stage, save_model
from keye.train.distributed import has_sharded_weights
from keye.train.rewards import combine_rewards, format_ok
from keye.train.rl_losses import PolicyLossConfig, masked_mean_B, sequence_loss
from keye.train.runner import BatchPlan
from keye.train.session import RunConfig, TrainSession, to_device
from keye.video import VideoOptions

log = logging.getLogger(__name__)

# tokens a completion may never contain (see RLStage.suppress)
LAYOUT_TOKENS = [IMAGE_PAD, VIDEO_PAD, FRAME, FAST_START, FAST_END, "<|vision_start|>", "<|vision_end|>",
                 "<|im_start|>"]
# row fields that are not reward columns
_NOT_COLUMNS = ("messages", "conversations", "videos", "images")


# ----------------------------------------------------------------------------- config


@dataclass
class RLDataConfig(DataConfig):
    eval: list[str] = field(default_factory=list)  # held-out jsonl files scored greedily at the end
    modes: dict[str, float] = field(default_factory=lambda: {"thinking": 1.0})  # keye.data.modes mixture
    kinds: list[str] = field(default_factory=list)  # keep only these question kinds; empty: all
    reasoning_only: bool = True  # keep only rows flagged ``reasoning`` (the multi-step questions)
    max_eval_samples: int | None = None
    seed: int = 0
    # frame rows (frame_texts per clip, as the world's frames.jsonl) joined to the rows by clip_id when a
    # reward reads them (placement)
    listings: list[str] = field(default_factory=lambda: ["world/frames.jsonl"])


@dataclass
class RolloutConfig:
    prompts_per_step: int = 4
    group_size: int = 8  # G completions per prompt
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off


@dataclass
class HintConfig:
    enabled: bool = True
    max_level: int = 5  # 1 observation, 2 strategy, 3 tool/formula, 4 first step, 5 full solution


@dataclass
class RLConfig(StageConfig):
    train: list[str] = field(default_factory=lambda: ["lm"])  # parameter groups that train
    data: RLDataConfig = field(default_factory=RLDataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    hints: HintConfig = field(default_factory=HintConfig)
    loss: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    rewards: dict[str, float] = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.5, "repetition": 0.5})
    zero_variance: Literal["filter", "resample", "keep"] = "resample"
    max_resample: int = 4  # extra prompt draws per step when resampling
    minibatch_size: int = 16  # sequences per optimizer step (run.micro_batch sequences per forward)
    epochs: int = 1  # passes over each rollout batch
    router_aux: bool = True  # add the MoE load-balancing (and z) loss to the policy loss
    # run.steps counts rollout steps; the schedule steps once per rollout step. run.accum_steps is unused.
    run: RunConfig = field(default_factory=lambda: RunConfig(steps=50, micro_batch=8))
    lora: LoraSettings = field(default_factory=LoraSettings)

    def __post_init__(self):
        super().__post_init__()
        if self.rollout.group_size < 2:
            raise ConfigError("rollout.group_size must be >= 2: advantages are normalised within a group")
        if self.minibatch_size < 1 or self.run.micro_batch < 1 or self.epochs < 1:
            raise ConfigError("minibatch_size, run.micro_batch and epochs must be >= 1")
        # The supervised runner's batch options have no meaning here: prompts are built per rollout, and the
        # clipped ratio (GSPO clips at 3e-4) needs fp32 log-probs. Say so rather than ignore them.
        if self.run.precision != "fp32":
            raise ConfigError(f"run.precision: the RL stage runs in fp32 (got {self.run.precision!r}): its clipped "
                              "importance ratios need fp32 log-probs")
        if self.run.num_workers:
            raise ConfigError("run.num_workers: the RL stage builds its prompts per rollout; leave it at 0")
        if self.run.dist.strategy not in ("none", "ddp", "fsdp2"):
            raise ConfigError(f"run.dist.strategy: the RL stage runs with 'none', 'ddp' or 'fsdp2' (got "
                              f"{self.run.dist.strategy!r})")


# ----------------------------------------------------------------------------- prompts and batches


@dataclass
class Prompt:
    """One prompt, tokenised, with its pixels: what generation and the log-prob pass both consume."""

    row: dict  # the (hinted) row: its fields are the reward columns
    text: str  # the chat-templated prompt
    input_ids_L: torch.Tensor
    vision: dict[str, torch.Tensor]  # pixel_values[_videos], *_grid_thw for this prompt


class PromptBuilder:
    """Rows -> ``Prompt``s through the SFT ``SampleBuilder`` (same messages, video defaults, clip cache)."""

    def __init__(self, processor, video: VideoOptions, base_dir: Path):
        self.processor = processor
        self.samples = SampleBuilder(processor, video, base_dir=base_dir)

    def __call__(self, row: dict) -> Prompt:
        messages, meta = self.samples.messages(row)
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        messages = messages[: last_user + 1]  # the reference answer is the reward's, not the prompt's
        text = self.processor.apply_chat_template(messages, think_mode=meta.get("think_mode"),
                                                  add_generation_prompt=True)
        enc = self.processor(text=[text], vision=self.samples.vision(messages))
        vision = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
        return Prompt(row, text, enc["input_ids"][0], vision)


def collate_prompts(prompts: list[Prompt], pad_id: int, completions: list[torch.Tensor] | None = None) -> dict:
    """Left-padded prompts (B, Lp), then right-padded completions (B, T) when given.

    The left padding puts every prompt's last token at the same column, so ``generate`` continues all
    rows together and the completion logits are the last T+1 positions. Returns model kwargs plus, with
    completions, ``completion_ids`` / ``completion_mask`` (B, T).
    """
    B, Lp = len(prompts), max(len(p.input_ids_L) for p in prompts)
    T = max((len(c) for c in completions), default=0) if completions is not None else 0
    ids = torch.full((B, Lp + T), pad_id, dtype=torch.long)
    mask = torch.zeros(B, Lp + T, dtype=torch.long)
    for b, p in enumerate(prompts):
        n = len(p.input_ids_L)
        ids[b, Lp - n : Lp], mask[b, Lp - n : Lp] = p.input_ids_L, 1
        if completions is not None:
            c = completions[b]
            ids[b, Lp : Lp + len(c)], mask[b, Lp : Lp + len(c)] = c, 1
    batch = {"input_ids": ids, "attention_mask": mask}
    for key in ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw"):
        parts = [p.vision[key] for p in prompts if key in p.vision]
        if parts:
            batch[key] = torch.cat(parts)
    if completions is not None:
        batch["completion_ids"], batch["completion_mask"] = ids[:, Lp:], mask[:, Lp:]
    return batch


# ----------------------------------------------------------------------------- rollouts


@dataclass
class Group:
    """G completions of one prompt and their scores."""

    prompt: Prompt
    hint_level: int
    completions: list[torch.Tensor]  # token ids, each cut after its first end-of-turn token
    texts: list[str]
    rewards_G: torch.Tensor
    terms: dict[str, list[float]]  # each reward's own values
    correct: list[bool]  # the final answer matches the reference (drives hint escalation)
    formatted: list[bool]  # the output has its think mode's shape

    @property
    def solved(self) -> bool:
        return any(self.correct)

    @property
    def zero_variance(self) -> bool:
        return float(self.rewards_G.max() - self.rewards_G.min()) < 1e-6


Sampler = Callable[[list[dict], int], list[Group]]  # (rows, hint level) -> one group per row


def cut_at_eos(generated_BT: torch.Tensor, eos_id: int) -> list[torch.Tensor]:
    """Each row up to and including its first ``eos_id`` (the whole row when it never ends)."""
    out = []
    for row in generated_BT:
        hits = (row == eos_id).nonzero()
        out.append(row[: int(hits[0]) + 1] if len(hits) else row)
    return out


def score_groups(prompts: list[Prompt], completions: list[torch.Tensor], processor, rewards: dict[str, float],
                 hint_level: int, group_size: int) -> list[Group]:
    """Decode, reward and judge ``len(prompts) * group_size`` completions (prompt-major order)."""
    texts = processor.batch_decode(completions, skip_special_tokens=True)
    rows = [p.row for p in prompts for _ in range(group_size)]
    columns = {k: [r.get(k) for r in rows] for k in {k for r in rows for k in r} - set(_NOT_COLUMNS)}
    total, terms = combine_rewards(rewards, [p.text for p in prompts for _ in range(group_size)], texts, columns)
    groups = []
    for i, prompt in enumerate(prompts):
        sl = slice(i * group_size, (i + 1) * group_size)
        correct = [is_correct(t, prompt.row["answer"], prompt.row.get("options")) for t in texts[sl]]
        formatted = [format_ok(t, prompt.row.get("think_mode")) for t in texts[sl]]
        groups.append(Group(prompt, hint_level, completions[sl], texts[sl], torch.tensor(total[sl]),
                            {k: v[sl] for k, v in terms.items()}, correct, formatted))
    return groups


def progressive_hints(rows: list[dict], groups: list[Group], sample: Sampler, max_level: int) -> list[Group]:
    """Replace each unsolved group by the group of the lowest hint level at which an answer is correct.

    Levels are tried in order, all still-unsolved prompts of a level in one batch; a prompt stops at its
    first solved level or when it runs out of hints, and then keeps its unhinted group (which the
    zero-variance filter usually drops).
    """
    out = list(groups)
    pending = [i for i, g in enumerate(groups) if not g.solved]
    for level in range(1, max_level + 1):
        todo = [i for i in pending if len(rows[i].get("hints") or []) >= level]
        if not todo:
            break
        hinted = sample([with_hint(rows[i], level) for i in todo], level)
        pending = [i for i in pending if i not in todo]
        for i, group in zip(todo, hinted):
            if group.solved:
                out[i] = group
            else:
                pending.append(i)
    return out


def group_advantages(rewards_G: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """(r - mean) / (std + eps) within a group (GRPO / GSPO; std unbiased, as TRL's default)."""
    return (rewards_G - rewards_G.mean()) / (rewards_G.std() + eps)


def collect_rollouts(
    draw: Callable[[], list[dict]], sample: Sampler, cfg: RLConfig
) -> tuple[list[Group], dict[str, float]]:
    """Draw prompts and sample groups until ``prompts_per_step`` groups with signal are kept.

    ``draw()`` returns the next prompts (rows) of the data order; ``sample(rows, level)`` one group per
    row. Unsolved groups go through ``progressive_hints``; zero-variance groups are dropped unless
    ``zero_variance: keep``, and with ``resample`` up to ``max_resample`` further draws refill the batch.
    """
    kept: list[Group] = []
    first: list[Group] = []  # the policy's own (unhinted) groups, for its accuracy and format rate
    draws, dropped = 0, 0
    max_draws = 1 + (cfg.max_resample if cfg.zero_variance == "resample" else 0)
    while len(kept) < cfg.rollout.prompts_per_step and draws < max_draws:
        rows = draw()
        draws += 1
        groups = sample(rows, 0)
        first += groups
        if cfg.hints.enabled:
            groups = progressive_hints(rows, groups, sample, cfg.hints.max_level)
        if cfg.zero_variance != "keep":
            dropped += sum(g.zero_variance for g in groups)
            groups = [g for g in groups if not g.zero_variance]
        kept += groups
    if cfg.zero_variance == "resample":
        kept = kept[: cfg.rollout.prompts_per_step]
    return kept, _rollout_stats(first, kept) | {"prompt_draws": draws, "zero_variance_dropped": dropped}


# ----------------------------------------------------------------------------- log-probs


def completion_logps(model: nn.Module, batch: dict, temperature: float, router: bool = False,
                     suppress: list[int] | None = None):
    """Per-token log-probs of the completions under ``model``, their entropies, and the router loss.

    The logits are divided by the sampling temperature and the ``suppress``ed ids are masked out, so the
    log-probs are those of the distribution the completions were drawn from (TRL divides by the
    temperature too). Returns logps_BT, entropy_BT (no grad) and the MoE router loss term (0 for a
    dense model or when ``router`` is off).
    """
    ids_BT, mask_BT = batch["completion_ids"], batch["completion_mask"]
    inputs = {k: v for k, v in batch.items() if k not in ("completion_ids", "completion_mask")}
    T = ids_BT.shape[1]
    out = model(**inputs, logits_to_keep=T + 1, use_cache=False, output_router_logits=router or None)
    logits_BTV = out.logits[:, :-1].float() / temperature  # position t predicts token t+1
    if suppress:
        logits_BTV = logits_BTV.index_fill(-1, torch.tensor(suppress, device=logits_BTV.device), float("-inf"))
    logp_BTV = logits_BTV.log_softmax(-1)
    logps_BT = logp_BTV.gather(-1, ids_BT[..., None]).squeeze(-1)
    with torch.no_grad():
        entropy_BT = -(logp_BTV.exp() * logp_BTV.nan_to_num(neginf=0.0)).sum(-1)
    aux = torch.zeros((), device=logps_BT.device)
    if router and out.aux_loss is not None:
        config = _config_of(model)
        aux = config.text_config.router_aux_loss_coef * out.aux_loss
        if getattr(config, "router_z_loss_coef", 0.0) and out.z_loss is not None:
            aux = aux + config.router_z_loss_coef * out.z_loss
    return logps_BT * mask_BT, entropy_BT, aux


def _config_of(model: nn.Module):
    while not hasattr(model, "config") and hasattr(model, "module"):
        model = model.module
    return model.config


@dataclass
class Completion:
    """One sampled completion as a training example, with its prompt and log-probs."""

    prompt: Prompt
    completion: torch.Tensor
    advantage: float
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None


def _micro_batches(seqs: list[Completion], size: int, pad_id: int):
    for start in range(0, len(seqs), size):
        chunk = seqs[start : start + size]
        yield chunk, collate_prompts([s.prompt for s in chunk], pad_id, [s.completion for s in chunk])


@torch.no_grad()
def _fill_logps(model, seqs, attr, size, pad_id, temperature, suppress, device=torch.device("cpu")) -> None:
    for chunk, batch in _micro_batches(seqs, size, pad_id):
        logps_BT, _, _ = completion_logps(model, to_device(batch, device), temperature, suppress=suppress)
        for s, row in zip(chunk, logps_BT.cpu()):
            setattr(s, attr, row[: len(s.completion)].clone())


def _pad_stack(rows: list[torch.Tensor], T: int) -> torch.Tensor:
    out = torch.zeros(len(rows), T)
    for b, r in enumerate(rows):
        out[b, : len(r)] = r
    return out


# ----------------------------------------------------------------------------- the stage


class RLStage:
    """Holds what a step needs (policy, processor, session) so each phase is a short method."""

    def __init__(self, cfg: RLConfig, run_root: Path, model=None, processor=None, resume: bool = True):
        self.cfg, self.run_root = cfg, Path(run_root)
        self.out_dir = self.run_root / cfg.out
        model, self.processor, self.reference = build_policy(cfg, self.run_root, model, processor)
        self.pad_id = self.processor.tokenizer.pad_token_id
        self.eos_id = self.processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        # A sampled vision placeholder would need pixels the prompt does not have (the forward rejects it),
        # and a policy has no business opening a turn or a frame: these ids are masked when sampling and
        # when scoring alike, so pi_old stays the distribution the completions came from.
        self.suppress = self.processor.tokenizer.convert_tokens_to_ids(LAYOUT_TOKENS)

        self.rows, base = read_rows(cfg.data.train, self.run_root)
        self.rows = _select_rows(self.rows, cfg.data, cfg.data.max_samples)
        if not self.rows:
            raise ConfigError(f"{cfg.out}: no training rows left after data.kinds / data.reasoning_only")
        if cfg.rewards.get("placement"):
            self.rows = _with_listings(self.rows, cfg.data.listings, self.run_root)
        self.prompts = PromptBuilder(self.processor, cfg.video, base)

        # one optimizer step per minibatch: the strategy's accumulation window is one backward call. Rollouts,
        # pi_old and the held-out eval run on whole weights (gathered under FSDP2, once per step): each rank
        # decodes for as many steps as its own completions need, which sharded forwards could not do without
        # waiting on each other.
        self.session = TrainSession(model, cfg.run, self.out_dir, accum_steps=1, resume=resume, desc=cfg.out,
                                    plots={"rewards.png": ("reward_mean", "accuracy", "format_pass")},
                                    progress=("reward_mean", "accuracy"), whole_weights=True)
        self.policy = self.session.unwrapped  # whole weights: refreshed at every rollout (``sync_policy``)
        if has_sharded_weights(self.session.model):
            self._check_one_vision_layout()
        self.device = self.session.device
        if self.reference is not None:
            self.reference.to(self.device)
        self.plan = BatchPlan(len(self.rows), cfg.rollout.prompts_per_step, self.session.world_size,
                              self.session.rank, cfg.run.seed)

    def sync_policy(self) -> nn.Module:
        """``self.policy``: the policy with whole, current weights on this rank (peft adapters included), which
        generation and the no-grad log-prob passes run on. Every rank calls it together (FSDP2 gathers)."""
        self.policy = self.session.whole_weights()
        return self.policy

    def _check_one_vision_layout(self) -> None:
        """Sharded forwards are collectives per block: every rank's micro-batch must run the same towers the same
        number of times, so rows that mix images and videos (or none) would leave the ranks waiting."""
        layouts = {tuple(sorted({p["type"] for m in self.prompts.samples.messages(row)[0] for p in m["content"]
                                 if p["type"] in ("image", "video")})) for row in self.rows}
        if len(layouts) > 1:
            raise ConfigError(f"run.dist.strategy: fsdp2 needs every RL row to carry the same kinds of visual input "
                              f"(the rows have {sorted(layouts)}); use ddp, or split the rows by kind")

    # ------------------------------------------------------------------ rollouts

    @torch.no_grad()
    def sample(self, rows: list[dict], hint_level: int = 0) -> list[Group]:
        """G sampled completions for each row, one batched ``generate`` call."""
        r = self.cfg.rollout
        prompts = [self.prompts(row) for row in rows]
        batch = to_device(collate_prompts([p for p in prompts for _ in range(r.group_size)], self.pad_id), self.device)
        self.policy.eval()
        generated = self.policy.generate(
            **batch, do_sample=True, temperature=r.temperature, top_p=r.top_p, top_k=r.top_k or None,
            max_new_tokens=r.max_new_tokens, eos_token_id=self.eos_id, pad_token_id=self.pad_id,
            suppress_tokens=self.suppress,
        )
        completions = cut_at_eos(generated[:, batch["input_ids"].shape[1] :].cpu(), self.eos_id)
        return score_groups(prompts, completions, self.processor, self.cfg.rewards, hint_level, r.group_size)

    def rollout(self, position: int) -> tuple[list[Group], int, dict[str, float]]:
        """One rollout batch from the data position on; returns it, the next position and its stats."""

        def draw() -> list[dict]:
            nonlocal position
            position += 1
            return [self.rows[i] for i in self.plan.indices(position - 1)]

        self.sync_policy()
        kept, stats = collect_rollouts(draw, self.sample, self.cfg)
        return kept, position, stats

    # ------------------------------------------------------------------ update

    def update(self, groups: list[Group], step: int) -> dict[str, float]:
        """Minibatched policy-gradient steps over one rollout batch; returns averaged stats.

        Ranks keep different numbers of groups (zero-variance groups are dropped per rank), but DDP needs
        every rank in the same collectives: all ranks take the step count of the largest batch and the
        same micro-batches per step, a rank that has run out forwarding a zero-weight stand-in, and every
        loss is divided by the step's sequence count over all ranks."""
        cfg = self.cfg
        seqs = [Completion(g.prompt, c, float(a))
                for g in groups for c, a in zip(g.completions, group_advantages(g.rewards_G))]
        most = self._sync_max(len(seqs))  # sequences on the fullest rank
        if not most:
            return {}
        temperature, mb = cfg.rollout.temperature, cfg.run.micro_batch
        self.session.model.train()
        # pi_old: the rollout policy (whole weights as of this step's rollout). With one epoch and one minibatch
        # pi == pi_old numerically; with several, later minibatches see a moved policy and the ratio does its
        # job. No gradient, outside the wrapper's collectives.
        policy = self.policy
        _fill_logps(policy, seqs, "old_logps", mb, self.pad_id, temperature, self.suppress, self.device)
        if self.reference is not None:
            _fill_logps(self.reference, seqs, "ref_logps", mb, self.pad_id, temperature, self.suppress, self.device)
        totals: dict[str, float] = {}
        updates = 0
        minibatches = -(-most // cfg.minibatch_size)
        for epoch in range(cfg.epochs):
            # the shuffle is a function of (seed, step, epoch) alone, so a resumed run replays it
            gen = torch.Generator().manual_seed(cfg.run.seed * 1_000_003 + step * 101 + epoch)
            order = torch.randperm(len(seqs), generator=gen)
            shuffled = [seqs[i] for i in order.tolist()]
            for k in range(minibatches):
                chunk = shuffled[k * cfg.minibatch_size : (k + 1) * cfg.minibatch_size]
                stats = self._minibatch(chunk, stand_in=seqs[0] if seqs else None)
                for key, v in stats.items():
                    totals[key] = totals.get(key, 0.0) + v
                updates += 1
        return {k: v / updates for k, v in totals.items()} | {"updates": updates}

    def _sync_max(self, value: int) -> int:
        """The largest ``value`` over the ranks."""
        if self.session.strategy.world_size == 1:
            return value
        t = torch.tensor(value, device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return int(t)

    def _minibatch(self, seqs: list[Completion], stand_in: Completion | None = None) -> dict[str, float]:
        """One optimizer step: the sum of per-sequence losses / the step's sequences on all ranks, over
        micro-batches (as many on every rank; ``stand_in`` fills a rank's missing ones at weight 0)."""
        cfg, world = self.cfg, self.session.strategy.world_size
        micro = list(_micro_batches(seqs, cfg.run.micro_batch, self.pad_id))
        n = len(seqs)
        if world > 1:
            counts = torch.tensor([n, len(micro)], device=self.device)
            torch.distributed.all_reduce(counts[:1])
            torch.distributed.all_reduce(counts[1:], op=torch.distributed.ReduceOp.MAX)
            n_all, n_micro = int(counts[0]), int(counts[1])
            if len(micro) < n_micro:
                if stand_in is None:
                    raise RuntimeError("RL: this rank kept no sequences at all while another did; nothing to stand in with")
                micro += [([stand_in], None)] * (n_micro - len(micro))
        else:
            n_all = n
        # DDP averages gradients over the ranks: world / n_all makes the result sum(losses) / n_all
        scale = world / n_all
        sums: dict[str, float] = {}
        router = cfg.router_aux and _config_of(self.session.model).is_moe
        for k, (chunk, batch) in enumerate(micro):
            weight = 1.0 if batch is not None else 0.0  # a stand-in takes part in the collectives only
            if batch is None:
                _, batch = next(_micro_batches(chunk, 1, self.pad_id))
            with self.session.strategy.accumulating(self.session.model, boundary=k == len(micro) - 1):
                batch = to_device(batch, self.device)
                logps_BT, entropy_BT, aux = completion_logps(
                    self.session.model, batch, cfg.rollout.temperature, router, self.suppress)
                mask_BT = batch["completion_mask"]
                T = mask_BT.shape[1]
                old_BT = _pad_stack([s.old_logps for s in chunk], T).to(self.device)
                ref_BT = _pad_stack([s.ref_logps for s in chunk], T).to(self.device) if self.reference is not None else None
                adv_B = torch.tensor([s.advantage for s in chunk], device=self.device)
                loss_B, stats = sequence_loss(logps_BT, old_BT, adv_B, mask_BT, cfg.loss, ref_BT)
                share = weight * len(chunk) / max(n, 1)
                self.session.strategy.backward(weight * (loss_B.sum() * scale + aux * len(chunk) * scale))
            for key, value in stats.items():
                sums[key] = sums.get(key, 0.0) + float(value) * share
            sums["loss"] = sums.get("loss", 0.0) + weight * float(loss_B.detach().sum()) / max(n, 1)
            sums["entropy"] = sums.get("entropy", 0.0) + weight * float(masked_mean_B(entropy_BT, mask_BT).sum()) / max(n, 1)
            if router:
                sums["router_aux"] = sums.get("router_aux", 0.0) + float(aux.detach()) * share
        sums["grad_norm"] = self.session.optimizer_step()
        return sums

    # ------------------------------------------------------------------ loop

    def run(self) -> None:
        """Rollout steps until ``run.steps``, each closed (schedule, metrics, checkpoint) by the session."""
        position = self.session.data_position.get("position", 0)
        for step in self.session.steps():
            groups, position, stats = self.rollout(position)
            stats |= self.update(groups, step)
            self.session.end_step(stats, {"position": position})

    # ------------------------------------------------------------------ held-out

    @torch.no_grad()
    def evaluate(self, rows: list[dict], batch_size: int = 16) -> tuple[dict, list[dict]]:
        """Greedy answers to ``rows`` (rendered in the training modes): the figures of ``held_out_figures``
        and one record per row (its completion, whether it is right and well formed, its placement claims
        and how many the clip's frame listing confirms, where the row has one). Under torchrun each rank
        answers every world_size-th row and the records are gathered, so every rank returns the same."""
        policy = self.sync_policy().eval()
        world, rank = self.session.strategy.world_size, self.session.strategy.rank
        mine = rows[rank::world]
        records = []
        for start in range(0, len(mine), batch_size):
            chunk = mine[start : start + batch_size]
            prompts = [self.prompts(r) for r in chunk]
            batch = to_device(collate_prompts(prompts, self.pad_id), self.device)
            generated = policy.generate(**batch, do_sample=False, max_new_tokens=self.cfg.rollout.max_new_tokens,
                                            eos_token_id=self.eos_id, pad_token_id=self.pad_id,
                                            suppress_tokens=self.suppress)
            texts = self.processor.batch_decode(cut_at_eos(generated[:, batch["input_ids"].shape[1] :].cpu(), self.eos_id),
                                                skip_special_tokens=True)
            for text, row in zip(texts, chunk):
                claims, right = confirmed_claims(text, row.get("frame_texts") or [])
                records.append({
                    "id": row.get("id"), "kind": row.get("kind"), "answer": row["answer"], "completion": text,
                    "correct": bool(is_correct(text, row["answer"], row.get("options"))),
                    "formatted": bool(format_ok(text, row.get("think_mode"))), "claims": claims,
                    "claims_right": right if row.get("frame_texts") else None,
                })
        if world > 1:
            gathered: list[list[dict]] = [[] for _ in range(world)]
            torch.distributed.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
        return held_out_figures(records), records


def held_out_figures(records: list[dict]) -> dict:
    """``accuracy`` and ``format_pass`` over the records, ``per_kind`` accuracy, ``claims_per_answer`` (placement
    claims in a completion) and ``claims_right`` (the share of all claims that the frame listings confirm, over
    the records that have a listing; None without any)."""
    n = max(len(records), 1)
    kinds: dict[str, list[bool]] = {}
    for r in records:
        kinds.setdefault(str(r["kind"]), []).append(r["correct"])
    listed = [r for r in records if r["claims_right"] is not None]
    claims = sum(r["claims"] for r in listed)
    return {
        "accuracy": sum(r["correct"] for r in records) / n, "format_pass": sum(r["formatted"] for r in records) / n,
        "n": len(records), "per_kind": {k: sum(v) / len(v) for k, v in sorted(kinds.items())},
        "claims_per_answer": sum(r["claims"] for r in records) / n,
        "claims_right": sum(r["claims_right"] for r in listed) / claims if claims else None,
    }


def _select_rows(rows: list[dict], data: RLDataConfig, limit: int | None) -> list[dict]:
    """Rows the RL stage samples from: reasoning / kind filters, then rendered in the think modes."""
    kept = [r for r in rows if (not data.reasoning_only or r.get("reasoning"))
            and (not data.kinds or r.get("kind") in data.kinds) and "answer" in r]
    kept = assign_modes(kept, data.modes, seed=data.seed) if data.modes else kept
    return kept[:limit] if limit else kept


def _with_listings(rows: list[dict], files: list[str], run_root: Path) -> list[dict]:
    """Rows with their clip's ``frame_texts`` (from frame rows keyed by ``clip_id``), for the placement reward."""
    listings = {row["clip_id"]: row["frame_texts"] for row in read_rows(files, run_root)[0] if "frame_texts" in row}
    missing = sorted({row.get("clip_id") for row in rows} - set(listings), key=str)
    if missing:
        raise ConfigError(f"data.listings {files}: no frame_texts for clip(s) {missing[:3]} (of {len(missing)}); the "
                          "placement reward checks each chain against its clip's listing")
    return [{**row, "frame_texts": listings[row["clip_id"]]} for row in rows]


def _with_world_listings(rows: list[dict], base: Path) -> list[dict]:
    """Held-out rows with their clip's ``frame_texts``, regenerated from the world config in ``base`` (the world
    writes frame rows for its train clips only); rows as they are when ``base`` holds no world."""
    world_json = base / "world.json"
    if not world_json.is_file():
        return rows
    config = WorldConfig.from_dict(json.loads(world_json.read_text())["config"])
    clips = clips_of_rows(config, [row for row in rows if row.get("clip_id") and "frame_texts" not in row])
    listings = {clip_id: [list(p) for p in frame_texts(clip)] for clip_id, clip in clips.items()}
    return [{**row, "frame_texts": listings[row["clip_id"]]} if row.get("clip_id") in listings else row for row in rows]


def build_policy(cfg: RLConfig, run_root: Path, model=None, processor=None):
    """(policy, processor, reference): the starting model (``init_from`` or a fresh variant unless one is
    given) with the freeze plan and LoRA applied, and a frozen copy for the KL term when ``loss.beta``."""
    # the KL reference is the starting policy, frozen (TRL's default without PEFT); only kept when used
    reference: list[nn.Module] = []
    keep = (lambda start: reference.append(_frozen_copy(start))) if cfg.loss.beta else None
    model, processor, _ = prepare(cfg, run_root, cfg.lora, adapt=keep,
                                  start=(model, processor) if model is not None else None)
    return model, processor, reference[0] if reference else None


def _frozen_copy(model: nn.Module) -> nn.Module:
    import copy

    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def _rollout_stats(first: list[Group], kept: list[Group]) -> dict[str, float]:
    """Logged per step: the policy's own (unhinted) accuracy and format rate, and the kept batch's
    reward mean/std, response length and hint levels."""
    out: dict[str, float] = {}
    if first:
        out["accuracy"] = sum(sum(g.correct) for g in first) / sum(len(g.correct) for g in first)
        out["format_pass"] = sum(sum(g.formatted) for g in first) / sum(len(g.formatted) for g in first)
    if kept:
        rewards = torch.cat([g.rewards_G for g in kept])
        out |= {
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()) if len(rewards) > 1 else 0.0,
            "response_length": sum(len(c) for g in kept for c in g.completions) / len(rewards),
            "hinted_share": sum(g.hint_level > 0 for g in kept) / len(kept),
            "hint_level_mean": sum(g.hint_level for g in kept) / len(kept),
            "groups_kept": len(kept),
        }
        for name in kept[0].terms:
            out[f"reward/{name}"] = sum(sum(g.terms[name]) for g in kept) / len(rewards)
    return out


@register_stage("rl", RLConfig)
def run_rl(cfg: RLConfig, run_root: str | Path, model=None, processor=None, resume: bool = True) -> Path:
    """Train, score ``data.eval``, save the policy to ``<run_root>/<out>/model``; returns the stage folder."""
    stage = RLStage(cfg, Path(run_root), model, processor, resume)
    stage.run()
    if cfg.data.eval:
        eval_rows, base = read_rows(cfg.data.eval, stage.run_root)
        eval_rows = _select_rows(eval_rows, cfg.data, cfg.data.max_eval_samples)
        result, records = stage.evaluate(_with_world_listings(eval_rows, base))  # rows split over the ranks
        if stage.session.is_main:
            atomic_write_text(stage.out_dir / "eval.json", json.dumps(result, indent=1))
            atomic_write_text(stage.out_dir / "eval_answers.jsonl", "".join(json.dumps(r) + "\n" for r in records))
        log.info("%s: held-out %s", cfg.out, result)
    policy = stage.session.finish()
    save_model(policy, stage.processor, stage.out_dir)  # every rank: rank 0 writes, the others wait
    return stage.out_dir
