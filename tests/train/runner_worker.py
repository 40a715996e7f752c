"""Run by tests/train/test_distributed.py under torchrun: the training runner itself with a strategy.

The runner hands each rank its slice of every global batch and reduces the loss over ranks; the run
(losses, final weights) must equal one process training on the whole batch. The job then ends the way
``keye train`` does, with ``shutdown_process_group``.
"""

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_runner import TokenModel, collate, count_units, make_dataset  # noqa: E402
from torch import nn  # noqa: E402

from keye.train.distributed import DistConfig, gathered_state_dict, shutdown_process_group  # noqa: E402
from keye.train.metrics import read_metrics  # noqa: E402
from keye.train.optim import OptimConfig  # noqa: E402
from keye.train.runner import RunConfig, StepLoss, train  # noqa: E402

GLOBAL_BATCH = 4


class SeqModel(TokenModel):
    """The loss in forward: a data-parallel wrapper must see the whole step as one forward call."""

    def forward(self, batch):
        return sum(nn.functional.cross_entropy(self.lm_head(self.model(seq[:-1])), seq[1:], reduction="sum")
                   for seq in batch)


def main(strategy: str, run_dir: str, out: str, die_at_call: str = "0", ds_config: str | None = None) -> None:
    """``die_at_call`` > 0: every rank is killed in that call of the loss (after the step-3 checkpoint);
    ``ds_config``: the DeepSpeed JSON for strategy ``deepspeed``."""
    calls = 0

    def loss_fn(model, batch):
        nonlocal calls
        calls += 1
        if calls == int(die_at_call):
            raise KeyboardInterrupt
        return StepLoss(loss_sum=model(batch))

    world = int(os.environ.get("WORLD_SIZE", 1))
    cfg = RunConfig(steps=6, micro_batch=GLOBAL_BATCH // world, accum_steps=2, save_every=3,
                    optim=OptimConfig(lr=0.05, warmup_steps=2), dist=DistConfig(strategy=strategy, deepspeed_config=ds_config))
    model = train(SeqModel(), make_dataset(), collate, loss_fn, count_units, cfg, run_dir)
    state = {k: v.tolist() for k, v in gathered_state_dict(model).items()}  # FSDP2 / ZeRO-3 shards gathered
    if int(os.environ.get("RANK", 0)) == 0:
        losses = [row["loss"] for row in read_metrics(Path(run_dir) / "metrics.jsonl")]
        Path(out).write_text(json.dumps({"losses": losses, "state": state}))


if __name__ == "__main__":
    main(*sys.argv[1:])
    shutdown_process_group()
