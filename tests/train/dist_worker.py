"""Run by tests/train/test_distributed.py under torchrun: a tiny regression trained with a strategy.

Each rank takes its slice of a fixed global batch; the result (losses, final weights) must equal one process
training on the whole batch, for every strategy.
"""

import json
import os
import sys

import torch
from torch import nn

from keye.train.distributed import DistConfig, build_strategy, shutdown_process_group
from keye.train.optim import OptimConfig, build_optimizer


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


class Tiny(nn.Module):
    _no_split_modules = ["Block"]

    def __init__(self):
        super().__init__()
        self.model = nn.Sequential(Block(), Block())
        self.lm_head = nn.Linear(6, 1)

    def forward(self, x):
        return self.lm_head(self.model(x))


def main(strategy: str, out: str, ds_config: str | None = None) -> None:
    accum, steps = 2, 3
    torch.manual_seed(0)
    model = Tiny()
    x = torch.randn(steps, accum, 8, 6)
    y = x.sum(-1, keepdim=True).sin()
    dist_cfg = DistConfig(strategy=strategy, deepspeed_config=ds_config)
    world = int(os.environ.get("WORLD_SIZE", 1))
    strat = build_strategy(dist_cfg, accum_steps=accum, grad_clip=1.0, micro_batch=8 // world)
    rank, world = strat.rank, strat.world_size
    model, optimizer = strat.setup(model, lambda m: build_optimizer(m, OptimConfig(lr=0.05)))
    losses = []
    for step in range(steps):
        total = 0.0
        for micro in range(accum):
            boundary = micro == accum - 1
            xs = x[step, micro].chunk(world)[rank]
            ys = y[step, micro].chunk(world)[rank]
            with strat.accumulating(model, boundary):
                loss = (model(xs) - ys).pow(2).mean()
                strat.backward(loss)
            total += loss.detach() / accum
        strat.step(model, optimizer)
        if world > 1:
            torch.distributed.all_reduce(total)
            total /= world
        losses.append(float(total))
    state = {k: v.tolist() for k, v in strat.full_state_dict(model).items()}
    if strat.is_main:
        with open(out, "w") as f:
            json.dump({"losses": losses, "state": state}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
    shutdown_process_group()  # after main's models are released, as `keye train` ends a job
