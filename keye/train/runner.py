"""The training loop every stage shares: batches, accumulation, strategy, schedule, checkpoints, metrics.

A stage supplies a map-style dataset, a ``collate`` that turns a list of samples into a batch, a
``loss_fn(model, batch) -> StepLoss`` whose ``loss_sum`` is a SUM over the batch's target units (tokens,
pairs), and ``count_units(batch)``, their number, known before the forward. The runner divides by the units
of the whole accumulation window (across ranks), so batch 1 x 4 accumulation steps computes exactly what
batch 4 x 1 does; a mean per micro-batch would weight short samples more whenever lengths differ.

The batch order is a pure function of (seed, epoch, position), so a resumed run reads exactly the batches
the uninterrupted run would have, and the checkpoint only needs (epoch, position).

Placement is the runner's too: it moves the model and every batch to ``run.device`` (``auto``: this rank's
GPU when there is one, else the CPU), runs the forward under ``run.precision`` (``bf16``: autocast, fp32
master weights and optimizer states) and hands an unsharded model back on the device it came in on, so
stage code around ``train()`` (saving, weight merging, the tokenizer report) never sees a device.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from keye.errors import ConfigError
from keye.train.checkpoint import TrainState, latest_checkpoint, load_checkpoint, load_optimizer_state, save_checkpoint
from keye.train.distributed import DistConfig, Strategy, build_strategy
from keye.train.metrics import MetricsLog, plot_curves
from keye.train.optim import OptimConfig, build_optimizer, build_scheduler


class StepLoss(NamedTuple):
    loss_sum: torch.Tensor  # summed over the batch's units; the runner normalises
    aux_loss: torch.Tensor | None = None  # already a mean (e.g. the MoE router loss); averaged over the window
    metrics: dict[str, float] = {}


@dataclass
class RunConfig:
    steps: int = 100
    micro_batch: int = 4
    accum_steps: int = 1
    seed: int = 0
    log_every: int = 1
    save_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    num_workers: int = 0  # DataLoader worker processes building batches ahead; 0: built in the loop
    device: str = "auto"  # "auto" (this rank's GPU if any, else CPU), "cpu", "cuda", "cuda:1", ...
    precision: str = "fp32"  # "fp32" or "bf16" (autocast; weights and optimizer states stay fp32)
    optim: OptimConfig = field(default_factory=OptimConfig)
    dist: DistConfig = field(default_factory=DistConfig)


LossFn = Callable[[nn.Module, Any], StepLoss]
CountUnits = Callable[[Any], int]  # target units in a batch (e.g. label tokens), known before the forward
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}  # autocast dtype


def resolve_device(name: str) -> torch.device:
    """``run.device`` -> a torch device; ``auto`` picks the GPU torchrun assigned to this rank."""
    if name == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"run.device: {name!r} is not a device (auto, cpu, cuda, cuda:N)") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"run.device: {name!r} asked for, but this machine has no CUDA GPU (use auto or cpu)")
    return device


def to_device(batch: Any, device: torch.device) -> Any:
    """Tensors inside (nested) dicts, lists and tuples moved to ``device``; everything else as it is."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class BatchPlan:
    """Deterministic micro-batches: a seeded permutation per epoch, sliced per rank."""

    def __init__(self, num_samples: int, micro_batch: int, world_size: int, rank: int, seed: int):
        per_step = micro_batch * world_size
        if num_samples < per_step:
            raise ValueError(f"dataset has {num_samples} samples, fewer than one global micro-batch ({per_step})")
        self.num_samples, self.micro_batch, self.world_size, self.rank, self.seed = (
            num_samples, micro_batch, world_size, rank, seed)
        self.per_epoch = num_samples // per_step  # drop the ragged tail: every rank gets full micro-batches
        self._epoch, self._perm = -1, None

    def indices(self, position: int) -> list[int]:
        epoch, index = divmod(position, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.num_samples, generator=gen).tolist()
        start = (index * self.world_size + self.rank) * self.micro_batch
        return self._perm[start:start + self.micro_batch]


def train(
    model: nn.Module,
    dataset: Sequence,
    collate: Callable[[list], Any],
    loss_fn: LossFn,
    count_units: CountUnits,
    cfg: RunConfig,
    run_dir: str | Path,
    resume: bool = True,
    desc: str = "train",
) -> nn.Module:
    """Train ``model`` in place for ``cfg.steps`` optimizer steps; returns the (unwrapped) model."""
    run_dir = Path(run_dir)
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"run.precision: {cfg.precision!r} is not one of {sorted(PRECISIONS)}")
    strategy = build_strategy(cfg.dist, cfg.accum_steps, cfg.optim.grad_clip, cfg.micro_batch)
    device, home = resolve_device(cfg.device), _device_of(model)
    model.to(device)
    torch.manual_seed(cfg.seed)
    state, checkpoint = TrainState(), latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:  # weights and RNG go into the plain model, before any wrapping or sharding
        state = load_checkpoint(checkpoint, model)
    wrapped, optimizer = strategy.setup(model, lambda m: build_optimizer(m, cfg.optim))
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.steps)
    if checkpoint is not None:
        load_optimizer_state(checkpoint, resumable_optimizer(strategy, wrapped, optimizer), scheduler)
    plan = BatchPlan(len(dataset), cfg.micro_batch, strategy.world_size, strategy.rank, cfg.seed)
    log = MetricsLog(run_dir, resume_step=state.step if checkpoint else None) if strategy.is_main else None

    position = state.data_position.get("position", 0)
    micro_batches = _micro_batches(dataset, collate, plan, position, cfg.num_workers)
    bar = tqdm(total=cfg.steps, initial=state.step, desc=desc, disable=not strategy.is_main, dynamic_ncols=True)
    wrapped.train()
    while state.step < cfg.steps:
        started = time.perf_counter()
        batches = [next(micro_batches) for _ in range(cfg.accum_steps)]
        position += cfg.accum_steps
        stats = _accumulate(wrapped, batches, loss_fn, count_units, strategy, device, PRECISIONS[cfg.precision])
        stats["grad_norm"] = strategy.step(wrapped, optimizer)
        stats["lr"] = optimizer.param_groups[0]["lr"]
        scheduler.step()
        state.step += 1
        state.data_position = {"position": position, "epoch": position // plan.per_epoch}
        stats["step_time"] = time.perf_counter() - started
        bar.update(1)
        bar.set_postfix(loss=f"{stats['loss']:.4f}")
        if log is not None and state.step % cfg.log_every == 0:
            log.log(state.step, **stats)
        if (cfg.save_every and state.step % cfg.save_every == 0) or state.step == cfg.steps:
            save_run(run_dir, strategy, wrapped, optimizer, scheduler, state, cfg.keep_checkpoints)
    bar.close()
    if strategy.is_main:
        plot_curves(run_dir)
    model = strategy.unwrap(wrapped)
    # sharded parameters stay where the strategy put them; saving gathers them (full_state_dict)
    return model.to(home) if cfg.dist.strategy in ("none", "ddp") else model


class _PlanSampler(torch.utils.data.Sampler):
    """The plan's micro-batches from ``position`` on, endlessly (the loop decides when to stop)."""

    def __init__(self, plan: BatchPlan, position: int):
        self.plan, self.position = plan, position

    def __iter__(self):
        position = self.position
        while True:
            yield self.plan.indices(position)
            position += 1


def _micro_batches(dataset: Sequence, collate: Callable[[list], Any], plan: BatchPlan, position: int, num_workers: int):
    """Collated micro-batches in plan order from ``position`` on. With workers a DataLoader builds them
    ahead in other processes (the same batches: the order is the plan's, not the workers'). A dataset
    that counts the bad samples it skipped (``skipped``, ``errors``, as ``SkipBadSamples``) gets the
    workers' counts back with each batch, so its totals are the same as without workers."""
    if num_workers <= 0:
        return (collate([dataset[i] for i in indices]) for indices in _PlanSampler(plan, position))
    reports = isinstance(getattr(dataset, "skipped", None), Counter)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=_PlanSampler(plan, position),
                                         collate_fn=_CollateReportingSkips(collate) if reports else collate,
                                         num_workers=num_workers, prefetch_factor=4)
    return _merge_skips(iter(loader), dataset) if reports else iter(loader)


class _CollateReportingSkips:
    """Runs in a worker: the batch, and what the worker's copy of the dataset skipped since its last batch
    (the samples of a batch are loaded just before it is collated, so those are this batch's skips)."""

    def __init__(self, collate: Callable[[list], Any]):
        self.collate, self.seen, self.errors_seen = collate, Counter(), 0

    def __call__(self, samples: list):
        dataset = torch.utils.data.get_worker_info().dataset
        skipped = dataset.skipped - self.seen
        errors = dataset.errors[self.errors_seen:]
        self.seen, self.errors_seen = Counter(dataset.skipped), len(dataset.errors)
        return self.collate(samples), dict(skipped), errors


def _merge_skips(batches, dataset):
    for batch, skipped, errors in batches:
        dataset.skipped.update(skipped)
        dataset.errors.extend(errors[: max(0, getattr(dataset, "keep_errors", 20) - len(dataset.errors))])
        yield batch


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters(), torch.empty(0)).device


def _accumulate(model: nn.Module, batches: list, loss_fn: LossFn, count_units: CountUnits, strategy: Strategy,
                device: torch.device, autocast_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Forward/backward each micro-batch, normalised by the units of the whole window on all ranks."""
    # on the device: NCCL reduces only GPU tensors
    units = torch.tensor(float(sum(count_units(b) for b in batches)), device=device)
    if strategy.world_size > 1:
        torch.distributed.all_reduce(units)
    if units == 0:
        raise ValueError("an accumulation window has no target units (e.g. every label masked): check the data")
    # Strategies average gradients over ranks and backward() divides by the window length, so scale the
    # summed loss by window / (units per rank): the gradient is then d(sum of losses)/d(theta) / units.
    scale = len(batches) * strategy.world_size / units
    total, aux_total = torch.zeros((), device=device), 0.0
    metrics: dict[str, float] = {}
    for k, batch in enumerate(batches):
        with strategy.accumulating(model, boundary=k == len(batches) - 1):
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                out = loss_fn(model, to_device(batch, device))
            loss = out.loss_sum * scale
            if out.aux_loss is not None:
                loss = loss + out.aux_loss
                aux_total += float(out.aux_loss.detach()) / len(batches)
            strategy.backward(loss)
        total += out.loss_sum.detach().float()
        for key, value in out.metrics.items():
            metrics[key] = metrics.get(key, 0.0) + float(value) / len(batches)
    if strategy.world_size > 1:
        torch.distributed.all_reduce(total)
    stats = {"loss": float(total / units), "units": float(units), **metrics}
    if aux_total:
        stats["aux_loss"] = aux_total
    if not math.isfinite(stats["loss"]):
        raise FloatingPointError(f"loss became {stats['loss']}: check the learning rate and the data")
    return stats


class _OptimizerRestorer:
    """Takes a checkpoint's optimizer state and hands it to the strategy, which shards it if it must."""

    def __init__(self, strategy: Strategy, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.strategy, self.model, self.optimizer = strategy, model, optimizer

    def load_state_dict(self, state: dict) -> None:
        self.strategy.load_optimizer_state_dict(self.model, self.optimizer, state)


def resumable_optimizer(strategy: Strategy, model: nn.Module, optimizer: torch.optim.Optimizer) -> _OptimizerRestorer:
    """What a checkpoint's optimizer state is loaded into (``model`` as the strategy wrapped it)."""
    return _OptimizerRestorer(strategy, model, optimizer)


def save_run(run_dir, strategy, model, optimizer, scheduler, state, keep):
    """Checkpoint a (possibly wrapped or sharded) model and its optimizer: every rank takes part in
    gathering the state dicts, rank 0 writes them."""
    full = strategy.full_state_dict(model)
    moments = strategy.optimizer_state_dict(model, optimizer)
    if strategy.is_main:
        save_checkpoint(run_dir, _StateHolder(full), _StateHolder(moments) if moments is not None else None,
                        scheduler, state, keep=keep)
    if strategy.world_size > 1:
        torch.distributed.barrier()


class _StateHolder(nn.Module):
    """Lets save_checkpoint write an already-gathered state dict (a model's or an optimizer's)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        super().__init__()
        self._state = state

    def state_dict(self, *args, **kwargs):
        return self._state
