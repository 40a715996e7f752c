"""Data parallelism applied from the outside: one place, one small class per strategy.

Model code is written for one device. A loop asks ``build_strategy(cfg)`` for a strategy, hands it the
model and an optimizer factory, and from then on only calls:

    with strategy.accumulating(model, boundary):   # no gradient sync until the accumulation boundary
        loss = compute(model, batch)
        strategy.backward(loss)                    # scaled by 1/accum_steps (DeepSpeed scales itself)
    if boundary:
        strategy.step(optimizer)                   # clip, step, zero grads

Strategies: ``none`` (one process), ``ddp`` (torch DDP), ``fsdp2`` (``fully_shard`` per block, then the
root), ``deepspeed`` (ZeRO-2/3 from a JSON config in ``pipelines/deepspeed/``). On CPU they all run over gloo,
which is how the tests check them against a single process.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from keye.errors import ConfigError, KeyeInputError

log = logging.getLogger(__name__)
OptimizerFactory = Callable[[nn.Module], torch.optim.Optimizer]


@dataclass
class DistConfig:
    strategy: str = "none"  # one of STRATEGIES
    deepspeed_config: str | None = None  # a JSON file; "auto" values are filled from the loop's settings


def init_process_group() -> tuple[int, int]:
    """Join the torchrun process group if launched by torchrun; returns (rank, world_size)."""
    if "RANK" not in os.environ or dist.is_initialized():
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    return dist.get_rank(), dist.get_world_size()


def _zero3_params(model: nn.Module) -> list[nn.Parameter]:
    """The parameters DeepSpeed ZeRO-3 partitioned (each rank holds a slice; the module sees empty tensors)."""
    return [p for p in model.parameters() if hasattr(p, "ds_id")]


def has_sharded_weights(model: nn.Module) -> bool:
    """Whether some of ``model``'s state is sharded (FSDP2 DTensors, ZeRO-3 partitions) and must be gathered to
    be saved."""
    from torch.distributed.tensor import DTensor

    return bool(_zero3_params(model)) or any(isinstance(v, DTensor) for v in model.state_dict().values())


def gathered_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s whole state dict as CPU tensors, its sharded entries (FSDP2 DTensors, ZeRO-3 partitions)
    gathered, so every rank must call it, in the same order. Works on a model that is only partly sharded too
    (stage 0's tower inside the SigLIP pair)."""
    from torch.distributed.tensor import DTensor

    partitioned = _zero3_params(model)
    if partitioned:
        import deepspeed

        with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in model.state_dict().items()}


def shutdown_process_group() -> None:
    """End a torchrun job's process group: every rank waits for the others, then destroys it.

    Call it once, when the job's work is done and its models are no longer used. A group left to die at
    interpreter exit is torn down while Python itself is being torn down, and gloo can then abort a
    process whose work had finished ("terminate called without an active exception"). Sharded models
    keep their device mesh in reference cycles, so those are collected first, while the group still
    exists. Not called on an error: destroying a group while another rank is still in a collective hangs.
    """
    if not dist.is_initialized():
        return
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


class Strategy:
    """One process, no wrapping. The base of the others."""

    def __init__(self, cfg: DistConfig, accum_steps: int = 1, grad_clip: float | None = None, micro_batch: int = 1):
        self.cfg, self.accum_steps, self.grad_clip, self.micro_batch = cfg, accum_steps, grad_clip, micro_batch
        self.rank, self.world_size = init_process_group()

    def setup(self, model: nn.Module, build_optimizer: OptimizerFactory,
              whole_copy: bool = False) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Wrap ``model`` and build its optimizer. ``whole_copy``: ``whole_weights`` will be asked for (a sharding
        strategy keeps a plain copy of the model to gather into)."""
        return model, build_optimizer(model)

    @contextlib.contextmanager
    def accumulating(self, model: nn.Module, boundary: bool) -> Iterator[None]:
        yield

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.accum_steps).backward()

    def step(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
        """Clip, step, zero grads; returns the gradient norm before clipping."""
        norm = self._clip(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return norm

    def _clip(self, model: nn.Module) -> float:
        params = [p for p in model.parameters() if p.grad is not None]
        max_norm = self.grad_clip if self.grad_clip else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    def whole_weights(self, model: nn.Module) -> nn.Module:
        """A module holding the whole current weights on this rank, for no-grad work each rank does on its own
        schedule (generation, scoring), where a sharded forward would wait on the other ranks' collectives.
        Every rank calls it at the same point of the loop. Here: the model itself."""
        return self.unwrap(model)

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The whole model's state dict on every rank (CPU tensors), for saving."""
        return gathered_state_dict(self.unwrap(model))

    def optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
        """The optimizer's whole state for a checkpoint, or None where this strategy cannot gather it.
        Every rank calls it (sharded strategies gather); the main rank's result is the one saved."""
        return optimizer.state_dict()

    def load_optimizer_state_dict(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        """Restore what ``optimizer_state_dict`` returned (every rank passes the whole state)."""
        optimizer.load_state_dict(state)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class DDPStrategy(Strategy):
    def setup(self, model, build_optimizer, whole_copy=False):
        model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        return model, build_optimizer(model.module)

    @contextlib.contextmanager
    def accumulating(self, model, boundary):
        # Must cover the forward too: DDP decides at forward time whether this backward all-reduces.
        with contextlib.nullcontext() if boundary else model.no_sync():
            yield

    def unwrap(self, model):
        return model.module


class FSDP2Strategy(Strategy):
    """``fully_shard`` each repeated block (HF's ``_no_split_modules``), then the root module."""

    def setup(self, model, build_optimizer, whole_copy=False):
        from torch.distributed.fsdp import fully_shard

        # a plain twin to gather into (whole_weights): one more copy of the weights on every rank
        self._whole = copy.deepcopy(model) if whole_copy else None
        block_names = set(getattr(model, "_no_split_modules", None) or [])
        for module in model.modules():
            if type(module).__name__ in block_names:
                fully_shard(module)
        fully_shard(model)
        return model, build_optimizer(model)

    @contextlib.contextmanager
    def accumulating(self, model, boundary):
        model.set_requires_gradient_sync(boundary)
        yield

    def whole_weights(self, model):
        """The plain twin made at setup, loaded with the shards gathered from every rank (a collective)."""
        if self._whole is None:
            raise RuntimeError("FSDP2: whole_weights needs setup(..., whole_copy=True)")
        self._whole.load_state_dict(gathered_state_dict(model))
        return self._whole

    def optimizer_state_dict(self, model, optimizer):
        """Moments gathered from every shard, keyed by parameter name (the main rank holds them)."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_optimizer_state_dict(self, model, optimizer, state):
        """Each rank keeps its own shard of the whole state."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


class DeepSpeedStrategy(Strategy):
    """DeepSpeed ZeRO from a JSON config; our torch optimizer is handed in (no op compilation on CPU)."""

    def setup(self, model, build_optimizer, whole_copy=False):
        import deepspeed

        if not self.cfg.deepspeed_config:
            raise ConfigError("dist.deepspeed_config: required for strategy 'deepspeed' (see pipelines/deepspeed/)")
        path = Path(self.cfg.deepspeed_config)
        if not path.is_file():
            raise ConfigError(f"dist.deepspeed_config: {path} not found")
        ds_config = _fill_auto(
            json.loads(path.read_text()),
            train_micro_batch_size_per_gpu=self.micro_batch,
            gradient_accumulation_steps=self.accum_steps,
            gradient_clipping=self.grad_clip or 0.0,
        )
        ds_config["train_batch_size"] = self.micro_batch * self.accum_steps * self.world_size
        ds_config.setdefault("zero_allow_untested_optimizer", True)
        engine, zero, _, _ = deepspeed.initialize(model=model, optimizer=build_optimizer(model), config=ds_config)
        # the torch optimizer ZeRO steps (``engine.optimizer`` wraps it): a torch LR schedule takes it, and its
        # param groups hold the learning rates ZeRO reads
        return engine, zero.optimizer

    def backward(self, loss):
        # The engine divides by gradient_accumulation_steps itself, and counts micro-steps in step():
        # it only reduces and updates at its own boundary, which coincides with the loop's.
        self._engine.backward(loss)
        self._engine.step()

    @contextlib.contextmanager
    def accumulating(self, model, boundary):
        self._engine = model
        yield

    def step(self, model, optimizer):
        norm = model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def unwrap(self, model):
        return model.module

    def optimizer_state_dict(self, model, optimizer):
        """The moments gathered from the ZeRO partitions, keyed by parameter name as FSDP2 keys them (every rank
        takes part; each gathers a full tensor per parameter and moment). None before the first step."""
        from deepspeed.utils import safe_get_full_optimizer_state

        base = optimizer  # the torch optimizer, stepping ZeRO's flat fp32 partitions
        if not base.state:
            return None
        first = next(iter(base.state.values()))
        moments = [k for k, v in first.items() if k != "step" and isinstance(v, torch.Tensor)]
        _link_moments(model.optimizer)
        state = {}
        for name, param in _trainable(model):
            state[name] = {k: safe_get_full_optimizer_state(param, k).detach().cpu() for k in moments}
            state[name]["step"] = torch.as_tensor(first["step"]).detach().cpu().clone()
        groups = [{k: v for k, v in group.items() if k != "params"} for group in base.param_groups]
        return {"state": state, "param_groups": groups}

    def load_optimizer_state_dict(self, model, optimizer, state):
        """Scatter each parameter's moments into this rank's partition, and restore the param groups' settings
        (the learning rate the schedule had set). ZeRO creates Adam's state in its first step, so it is created
        here, at the saved step count, for the moments to land in."""
        from deepspeed.utils import safe_set_full_optimizer_state

        if len(state["param_groups"]) != len(optimizer.param_groups):
            raise KeyeInputError(f"checkpoint: {len(state['param_groups'])} optimizer param groups, the run has "
                                 f"{len(optimizer.param_groups)} (a different freeze plan?)")
        for group, saved in zip(optimizer.param_groups, state["param_groups"]):
            group.update({k: v for k, v in saved.items() if k != "params"})
        entries = state["state"]
        first = next(iter(entries.values()))
        moments = [k for k in first if k != "step"]
        zero = model.optimizer  # ZeRO-1/2 keep their flat fp32 partitions in the param groups, ZeRO-3 apart
        for flat in getattr(zero, "fp32_partitioned_groups_flat", None) or zero.single_partition_of_fp32_groups:
            optimizer.state[flat] = {"step": first["step"].clone().float(), **{k: torch.zeros_like(flat) for k in moments}}
        _link_moments(zero)
        device = next(model.parameters()).device
        for name, param in _trainable(model):
            for key in moments:
                value = entries[name][key].to(device)
                if hasattr(param, "ds_id"):
                    _set_zero3_moment(zero, param, value, key)
                else:
                    safe_set_full_optimizer_state(param, value, key)


def _trainable(engine) -> list[tuple[str, nn.Parameter]]:
    """The engine's trainable parameters by their names in the unwrapped model, in a fixed order."""
    return [(name, p) for name, p in engine.module.named_parameters() if p.requires_grad]


def _link_moments(zero) -> None:
    """Point ZeRO-1/2's per-parameter views (what ``safe_get/set_full_optimizer_state`` read and write) at the
    optimizer state of every param group. ZeRO links them itself right after the first group's first step,
    when the other groups have no state yet, and never again: their views stay empty (DeepSpeed 0.19.8).
    Linking again is harmless. ZeRO-3 reads the state directly and has nothing to link."""
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    for lp_params, flat in zip(getattr(zero, "bit16_groups", []), getattr(zero, "single_partition_of_fp32_groups", [])):
        lazy_init_hp_params_optimizer_state(lp_params, flat, zero.optimizer.state)


def _set_zero3_moment(zero, param, value: torch.Tensor, key: str) -> None:
    """This rank's slice of ``value`` (the whole moment of ``param``) into its ZeRO-3 partition. ZeRO-3 pads a
    parameter to equal partitions; DeepSpeed 0.19.8's ``set_full_hp_param`` slices the unpadded value and
    fails on a last partition that holds padding, so the value is padded first here."""
    part, _ = zero._get_fp32_opt_state_partition(param, release_swap_buffers=False, optim_state_key=key)
    n, rank = part.numel(), zero._get_param_partition_rank(param)
    flat = F.pad(value.flatten(), (0, max(0, n * (rank + 1) - value.numel())))
    part.data.copy_(flat[n * rank:n * (rank + 1)])


def _fill_auto(config: dict, **values) -> dict:
    out = dict(config)
    for key, value in values.items():
        if out.get(key, "auto") == "auto":
            out[key] = value
    return out


STRATEGIES: dict[str, type[Strategy]] = {
    "none": Strategy,
    "ddp": DDPStrategy,
    "fsdp2": FSDP2Strategy,
    "deepspeed": DeepSpeedStrategy,
}


def build_strategy(cfg: DistConfig, accum_steps: int = 1, grad_clip: float | None = None, micro_batch: int = 1) -> Strategy:
    if cfg.strategy not in STRATEGIES:
        raise ConfigError(f"dist.strategy: {cfg.strategy!r} is not one of {sorted(STRATEGIES)}")
    return STRATEGIES[cfg.strategy](cfg, accum_steps=accum_steps, grad_clip=grad_clip, micro_batch=micro_batch)
