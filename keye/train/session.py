"""One run's lifecycle, shared by every stage: placement, strategy, resume, optimizer and schedule,
checkpoints, metrics and progress.

A stage builds its model, opens a ``TrainSession`` on it and runs its own step inside ``session.steps()``::

    session = TrainSession(model, cfg.run, out_dir, desc="sft")
    for _ in session.steps():
        ...                                    # forward / backward through session.model (as the strategy wrapped it)
        stats["grad_norm"] = session.optimizer_step()
        session.end_step(stats, data_position={"position": position})
    model = session.finish()                   # unwrapped, back on the device it came from

The supervised runner (``keye.train.runner.train``) is a session plus micro-batch accumulation; the RL stage
is a session plus rollouts and minibatched policy updates (several ``optimizer_step`` calls per step).

On entry the session moves the model to ``run.device`` (``auto``: this rank's GPU when there is one),
seeds torch with ``run.seed``, restores the newest checkpoint of ``run_dir`` into the plain model (weights
and RNG, before any wrapping or sharding), lets the strategy wrap it and build the optimizer, and restores
the optimizer's and the schedule's state. ``end_step`` steps the schedule, logs ``metrics.jsonl`` and
writes a checkpoint every ``run.save_every`` steps and at the last one; the checkpoint holds the data
position the stage hands in, so a resumed run continues with exactly the data the uninterrupted run would
have seen.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from keye.errors import ConfigError, RunInterrupted
from keye.train.checkpoint import TrainState, latest_checkpoint, load_model_state, save_checkpoint
from keye.train.distributed import DistConfig, build_strategy
from keye.train.metrics import MetricsLog, plot_curves
from keye.train.optim import OptimConfig, build_optimizer, build_scheduler

log = logging.getLogger(__name__)
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16}  # autocast dtype
_STOP = threading.Event()  # set by the first Ctrl-C inside stop_after_step()
FIRST_LOGGED = 3  # steps logged whatever log_every says: a rerun is checked against them in seconds


@dataclass
class RunConfig:
    steps: int = 100
    micro_batch: int = 4
    accum_steps: int = 1
    seed: int = 0
    log_every: int = 1
    save_every: int = 0  # 0: only at the end
    # score the held-out set every N steps into metrics.jsonl as eval_* (stages that have one; 0: at the end only)
    eval_every: int = 0
    keep_checkpoints: int = 2
    num_workers: int = 0  # DataLoader worker processes building batches ahead; 0: built in the loop
    device: str = "auto"  # "auto" (this rank's GPU if any, else CPU), "cpu", "cuda", "cuda:1", ...
    precision: str = "fp32"  # "fp32" or "bf16" (autocast; weights and optimizer states stay fp32)
    # recompute every ViT and decoder block in the backward instead of keeping its activations
    activation_checkpointing: bool = False
    optim: OptimConfig = field(default_factory=OptimConfig)
    dist: DistConfig = field(default_factory=DistConfig)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ConfigError(f"run.precision: {self.precision!r} is not one of {sorted(PRECISIONS)}")


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
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple takes its fields one by one
        return type(batch)(*(to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def enable_activation_checkpointing(model: nn.Module) -> int:
    """Recompute each block of ``model`` in the backward (non-reentrant ``torch.utils.checkpoint``), keeping only
    its input: the blocks are the modules that carry transformers' ``gradient_checkpointing`` flag (every
    decoder layer, the ViT encoder's layer loop). Gradients are unchanged; one more forward is the price.
    Returns how many modules were switched (a ``ConfigError`` when none)."""
    checkpoint = functools.partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)
    switched = 0
    for module in model.modules():
        if hasattr(module, "gradient_checkpointing"):
            module._gradient_checkpointing_func = checkpoint
            module.gradient_checkpointing = True
            switched += 1
    if not switched:
        raise ConfigError(f"run.activation_checkpointing: {type(model).__name__} has no blocks to checkpoint")
    return switched


@contextlib.contextmanager
def stop_after_step() -> Iterator[None]:
    """Within the block, a first Ctrl-C asks every running session to stop after its current step: it
    writes a checkpoint of that step and raises ``RunInterrupted`` (rerunning resumes there). A second
    Ctrl-C interrupts at once. Outside the block (and outside the main thread) Ctrl-C is untouched."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def request_stop(signum, frame):
        _STOP.set()
        signal.signal(signal.SIGINT, previous)
        print("\nstopping after this step, with a checkpoint (Ctrl-C again to stop at once)", file=sys.stderr)

    _STOP.clear()
    previous = signal.signal(signal.SIGINT, request_stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _STOP.clear()


class TrainSession:
    """The lifecycle of one training run of ``model`` into ``run_dir`` (see the module docstring).

    accum_steps: micro-batches per optimizer step as the strategy sees them (default ``run.accum_steps``).
    plots: PNG name -> metrics drawn into it when the run finishes.
    progress: the metrics shown beside the progress bar.
    whole_weights: ``whole_weights()`` will be called (under FSDP2 each rank then keeps a plain copy).
    """

    def __init__(self, model: nn.Module, run: RunConfig, run_dir: str | Path, *, accum_steps: int | None = None,
                 resume: bool = True, desc: str = "train", plots: dict[str, tuple[str, ...]] | None = None,
                 progress: tuple[str, ...] = ("loss",), whole_weights: bool = False):
        self.run, self.run_dir = run, Path(run_dir)
        self.strategy = build_strategy(run.dist, accum_steps or run.accum_steps, run.optim.grad_clip, run.micro_batch)
        self.device = resolve_device(run.device)
        self._home = next(model.parameters(), torch.empty(0)).device
        model.to(self.device)
        torch.manual_seed(run.seed)
        checkpoint = latest_checkpoint(self.run_dir) if resume else None
        self.state = checkpoint.train_state if checkpoint is not None else TrainState()
        if checkpoint is not None:  # weights and RNG go into the plain model, before any wrapping or sharding
            load_model_state(model, checkpoint.model_state(), checkpoint.path)
            checkpoint.restore_rng()
        if run.activation_checkpointing:
            enable_activation_checkpointing(model)
        self.model, self.optimizer = self.strategy.setup(model, lambda m: build_optimizer(m, run.optim),
                                                         whole_copy=whole_weights)
        self.scheduler = build_scheduler(self.optimizer, run.optim, run.steps)
        if checkpoint is not None:
            moments = checkpoint.optimizer_state()
            if moments is not None:  # the strategy shards it where it must
                self.strategy.load_optimizer_state_dict(self.model, self.optimizer, moments)
            if checkpoint.scheduler_state is not None:
                self.scheduler.load_state_dict(checkpoint.scheduler_state)
            if self.is_main:
                log.info("%s: resumed from step %d (%s)", desc, self.state.step, checkpoint.path)
        self.log = MetricsLog(self.run_dir, resume_step=self.state.step if checkpoint else None) if self.is_main else None
        self.plots = plots if plots is not None else {"loss.png": ("loss",)}
        self.progress = progress
        self.bar = tqdm(total=run.steps, initial=self.state.step, desc=desc, disable=not self.is_main, dynamic_ncols=True)
        self._step_started = time.perf_counter()

    @property
    def is_main(self) -> bool:
        return self.strategy.is_main

    @property
    def world_size(self) -> int:
        return self.strategy.world_size

    @property
    def rank(self) -> int:
        return self.strategy.rank

    @property
    def unwrapped(self) -> nn.Module:
        """The model under the strategy's wrapper (the module generation and no-grad passes run on)."""
        return self.strategy.unwrap(self.model)

    def whole_weights(self) -> nn.Module:
        """The model with whole, current weights on this rank, for rank-local no-grad work such as generation
        (``Strategy.whole_weights``; the session must be opened with ``whole_weights=True``). Every rank calls
        it at the same point: a sharding strategy gathers."""
        return self.strategy.whole_weights(self.model)

    @property
    def data_position(self) -> dict[str, Any]:
        """Where the stage's data order stood at the restored checkpoint (empty for a fresh run)."""
        return self.state.data_position

    def steps(self) -> Iterator[int]:
        """The steps still to run (each one index, from the resumed step on); times each step."""
        while self.state.step < self.run.steps:
            step = self.state.step
            self._step_started = time.perf_counter()
            yield step
            if self.state.step == step:
                raise RuntimeError(f"step {step} ended without session.end_step()")

    def optimizer_step(self) -> float:
        """Clip, step and zero the gradients through the strategy; returns the norm before clipping."""
        return self.strategy.step(self.model, self.optimizer)

    def end_step(self, stats: dict[str, float], data_position: dict[str, Any]) -> None:
        """Close a step: learning rate and step time into ``stats``, the schedule stepped, the metrics
        logged, and a checkpoint (holding ``data_position``) written when one is due."""
        stats["lr"] = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.state.step += 1
        self.state.data_position = data_position
        stats["step_time"] = time.perf_counter() - self._step_started
        self.bar.update(1)
        shown = {k: f"{stats[k]:.4f}" for k in self.progress if k in stats}
        if shown:
            self.bar.set_postfix(shown)
        if self.log is not None and (self.state.step <= FIRST_LOGGED or self.state.step % self.run.log_every == 0):
            self.log.log(self.state.step, **stats)
        step, every = self.state.step, self.run.save_every
        saving = (every and step % every == 0) or step == self.run.steps
        if saving:
            self.save()
        if step < self.run.steps and self._stop_requested():
            if not saving:
                self.save()
            self.bar.close()
            raise RunInterrupted(f"stopped at step {step} of {self.run.steps}; checkpoint in "
                                 f"{self.run_dir / 'checkpoints'}; the same command resumes it")

    def log_eval(self, evaluate: Callable[[nn.Module], dict[str, float]]) -> dict[str, float]:
        """Score the current weights with ``evaluate`` (whole weights, eval mode, no grad, on the main rank;
        every rank calls this at the same step) and log its figures as ``eval_<name>``; names without a ``/``
        (the overall figures, not per-kind breakdowns) go into ``eval.png`` at the end. Returns the figures
        (empty on the other ranks)."""
        model = self.whole_weights()
        figures: dict[str, float] = {}
        if self.is_main:
            was_training = model.training
            model.eval()
            with torch.no_grad():
                figures = evaluate(model)
            model.train(was_training)
            self.log.log(self.state.step, **{f"eval_{k}": v for k, v in figures.items()})
            overall = ", ".join(f"{k} {v:.3f}" for k, v in figures.items() if "/" not in k)
            self.bar.write(f"{self.bar.desc} step {self.state.step}: {overall}")
        return figures

    def _stop_requested(self) -> bool:
        """Whether a stop was asked for on any rank (the ranks must stop at the same step)."""
        if self.world_size == 1:
            return _STOP.is_set()
        flag = torch.tensor(float(_STOP.is_set()), device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag)

    def save(self) -> None:
        """Checkpoint the (possibly wrapped or sharded) model and its optimizer: every rank takes part in
        gathering the state dicts, the main rank writes them."""
        weights = self.strategy.full_state_dict(self.model)
        moments = self.strategy.optimizer_state_dict(self.model, self.optimizer)
        if self.is_main:
            save_checkpoint(self.run_dir, weights, moments, self.scheduler.state_dict(), self.state,
                            keep=self.run.keep_checkpoints)
        if self.world_size > 1:
            torch.distributed.barrier()

    def finish(self) -> nn.Module:
        """Close the progress bar, draw the curves, and hand the model back unwrapped: on the device it
        came in on, or, when sharded, where the strategy put it (saving gathers it)."""
        self.bar.close()
        if self.is_main:
            for name, keys in self.plots.items():
                plot_curves(self.run_dir, keys=keys, name=name)
            evals = dict.fromkeys(k for row in self.log.rows() for k in row if k.startswith("eval_") and "/" not in k)
            if evals:
                plot_curves(self.run_dir, keys=tuple(evals), name="eval.png")
        model = self.unwrapped
        return model.to(self._home) if self.run.dist.strategy in ("none", "ddp") else model
