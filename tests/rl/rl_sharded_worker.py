"""Run by tests/rl/test_rl_stage.py (one process, or two under torchrun): the RL stage with rollouts that depend
only on the prompt and how often it was drawn (each prompt's group is sampled under its own seed), so a run on
two ranks, each drawing half of every step's prompts, can be compared with one process drawing them all. Writes
the trained weights (gathered) and the held-out eval of every row."""

import collections
import json
import os
import sys
import zlib
from pathlib import Path

import torch
from safetensors.torch import save_file

from keye.recipe import load_stage_config
from keye.train.distributed import gathered_state_dict, shutdown_process_group
from keye.train.rewards import REWARDS
from keye.train.stages.rl import RLStage

sys.path.insert(0, str(Path(__file__).parent))
from test_rl_stage import vowel_share  # noqa: E402  (the reward the single-process tests use)

RECIPE = Path(__file__).parents[2] / "pipelines" / "nano" / "rl.yaml"


def main(run_root: str, out: str, *overrides: str) -> None:
    REWARDS["vowels"] = vowel_share
    draws: collections.Counter = collections.Counter()
    real_sample = RLStage.sample

    def seeded_sample(self, rows, hint_level=0):
        groups = []
        for row in rows:
            draws[row["id"]] += 1
            torch.manual_seed(zlib.crc32(f"{row['id']}/{draws[row['id']]}".encode()))
            groups += real_sample(self, [row], hint_level)
        return groups

    RLStage.sample = seeded_sample
    stage = RLStage(load_stage_config(RECIPE, list(overrides)), Path(run_root))
    start = {k: v.clone() for k, v in gathered_state_dict(stage.session.model).items()}
    stage.run()
    held_out, _ = stage.evaluate(stage.rows)
    weights = gathered_state_dict(stage.session.model)  # every rank takes part
    if int(os.environ.get("RANK", 0)) == 0:
        moved = sum(not torch.equal(start[k], weights[k]) for k in weights)
        save_file({k: v.contiguous() for k, v in weights.items()}, f"{out}.safetensors")
        Path(f"{out}.json").write_text(json.dumps({"eval": held_out, "moved": moved}))


if __name__ == "__main__":
    main(*sys.argv[1:])
    shutdown_process_group()
