"""The supervised loop every stage but RL shares: a ``TrainSession`` plus micro-batch accumulation.

A stage supplies a map-style dataset, a ``collate`` that turns a list of samples into a batch, a
``loss_fn(model, batch) -> StepLoss`` whose ``loss_sum`` is a SUM over the batch's target units (tokens,
pairs), and ``count_units(batch)``, their number, known before the forward. The loop divides by the units
of the whole accumulation window (across ranks), so batch 1 x 4 accumulation steps computes exactly what
batch 4 x 1 does; a mean per micro-batch would weight short samples more whenever lengths differ.

The batch order is a pure function of (seed, epoch, position), so a resumed run reads exactly the batches
the uninterrupted run would have, and the checkpoint only needs (epoch, position). The forward runs under
``run.precision`` (``bf16``: autocast, fp32 master weights and optimizer states); placement, resume,
checkpoints and metrics are the session's (``keye.train.session``), so stage code around ``train()``
(saving, weight merging, the tokenizer report) never sees a device or a wrapper.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import torch
from torch import nn

from keye.train.distributed import Strategy
from keye.train.session import PRECISIONS, RunConfig, TrainSession, to_device


class StepLoss(NamedTuple):
    loss_sum: torch.Tensor  # summed over the batch's units; the runner normalises
    aux_loss: torch.Tensor | None = None  # already a mean (e.g. the MoE router loss); averaged over the window
    metrics: dict[str, float] = {}


LossFn = Callable[[nn.Module, Any], StepLoss]
CountUnits = Callable[[Any], int]  # target units in a batch (e.g. label tokens), known before the forward


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
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
) -> nn.Module:
    """Train ``model`` in place for ``cfg.steps`` optimizer steps; returns the (unwrapped) model. With
    ``evaluate`` and ``cfg.eval_every``, its figures on the current weights are logged every that many
    steps (``TrainSession.log_eval``)."""
    periodic = evaluate is not None and cfg.eval_every > 0
    session = TrainSession(model, cfg, run_dir, resume=resume, desc=desc, whole_weights=periodic)
    plan = BatchPlan(len(dataset), cfg.micro_batch, session.world_size, session.rank, cfg.seed)
    position = session.data_position.get("position", 0)
    micro_batches = _micro_batches(dataset, collate, plan, position, cfg.num_workers)
    session.model.train()
    for _ in session.steps():
        window = [next(micro_batches) for _ in range(cfg.accum_steps)]
        position += cfg.accum_steps
        stats = _accumulate(session.model, window, loss_fn, count_units, session.strategy, session.device,
                            PRECISIONS[cfg.precision])
        stats["grad_norm"] = session.optimizer_step()
        session.end_step(stats, {"position": position, "epoch": position // plan.per_epoch})
        if periodic and session.state.step % cfg.eval_every == 0:
            session.log_eval(evaluate)
    return session.finish()


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
