"""Run by tests/rl/test_rl_stage.py under torchrun: the RL stage with DDP on two ranks that keep
different numbers of groups (rank 1 drops one), which must neither hang nor let the replicas drift;
then the held-out eval, split over the ranks, against the same eval of all rows on one rank."""

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

from keye.train.distributed import shutdown_process_group
from keye.train.rewards import REWARDS
from keye.recipe import load_stage_config
from keye.train.stages.rl import RLStage

sys.path.insert(0, str(Path(__file__).parent))
from test_rl_stage import vowel_share  # noqa: E402  (the reward the single-process tests use)

RECIPE = Path(__file__).parents[2] / "pipelines" / "nano" / "rl.yaml"


def main(run_root: str, *overrides: str) -> None:
    REWARDS["vowels"] = vowel_share
    rank = int(os.environ.get("RANK", 0))
    real_rollout = RLStage.rollout

    def uneven_rollout(self, position):
        groups, position, stats = real_rollout(self, position)
        return (groups[:-1] if rank == 1 else groups), position, stats

    RLStage.rollout = uneven_rollout
    stage = RLStage(load_stage_config(RECIPE, list(overrides)), Path(run_root))
    before = {k: v.detach().clone() for k, v in stage.session.unwrapped.state_dict().items()}
    stage.run()
    after = {k: v.detach().contiguous() for k, v in stage.session.unwrapped.state_dict().items()}
    moved = sum(not torch.equal(before[k], after[k]) for k in after)
    save_file(after | {"moved": torch.tensor(moved)}, str(Path(run_root) / f"rank{rank}.safetensors"))

    scored = []
    build_prompt = stage.prompts
    stage.prompts = lambda row: scored.append(row["id"]) or build_prompt(row)
    split, _ = stage.evaluate(stage.rows)
    mine = list(scored)
    stage.session.strategy.world_size, stage.session.strategy.rank = 1, 0  # this rank alone, every row (no collective)
    whole, _ = stage.evaluate(stage.rows)
    (Path(run_root) / f"eval{rank}.json").write_text(json.dumps({"split": split, "whole": whole, "scored": mine,
                                                                          "rows": [r["id"] for r in stage.rows]}))


if __name__ == "__main__":
    main(*sys.argv[1:])
    shutdown_process_group()
