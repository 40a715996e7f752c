"""The text stage: the world written as text (listings a test can read back), a short run that learns only
the decoder, and held-out scores on exactly the questions of the world's val / test files."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from keye.data.world import WorldConfig, generate_world
from keye.data.world.generate import frame_objects
from keye.data.world.text import listing, pretraining_clip
from keye.errors import ConfigError
from keye.recipe import load_stage_config, run_stage
from keye.train.metrics import read_metrics
from keye.train.optim import group_of


def test_the_listing_holds_every_frame_object_and_cut():
    config = WorldConfig(seed=5)
    for index in range(12):
        clip, _ = pretraining_clip(index, config)
        lines = listing(clip).splitlines()
        frames = list(frame_objects(clip))
        assert len(lines) == len(frames)
        for line, (seconds, seen) in zip(lines, frames):
            head, objects = line.split(": ", 1)
            assert head.startswith(f"{seconds:.1f}s ")
            entries = [] if objects == "nothing" else objects.split(", ")
            assert [" ".join(e.split()[:2]) for e in entries] == [obj.name for _, _, obj in seen]
            for entry, (x, y, _) in zip(entries, seen):
                gx, gy = (int(v) for v in entry.split()[2:])
                assert 1 <= gx <= 99 and 1 <= gy <= 99
                assert abs(gx - x * 99 / clip.width) <= 1.5 and abs(gy - y * 99 / clip.height) <= 1.5
        backgrounds = [line.split(":")[0].split(" ", 1)[1] for line in lines]
        changes = sum(a != b for a, b in zip(backgrounds, backgrounds[1:]))
        assert changes == len(clip.shots) - 1  # every cut shows as a background change, and nothing else does


def test_the_text_stage_refuses_the_held_out_world_and_data_files(tmp_path):
    stage = tmp_path / "text.yaml"
    stage.write_text("stage: text\nworld: {seed: 0}\n")
    with pytest.raises(ConfigError, match="world.seed: 0 is the held-out world"):
        load_stage_config(stage)
    stage.write_text("stage: text\ndata: {train: [world/train.jsonl]}\n")
    with pytest.raises(ConfigError, match="data.train: the text stage reads no files"):
        load_stage_config(stage)


def test_a_short_text_run_trains_the_decoder_only_and_scores_the_held_out_questions(tmp_path):
    stage = tmp_path / "text.yaml"
    stage.write_text(yaml.safe_dump({
        "stage": "text", "eval_clips": {"val": 1, "test": 2}, "eval_lookups": 10,
        "run": {"steps": 8, "micro_batch": 4, "optim": {"lr": 3.0e-3, "warmup_steps": 0, "schedule": "constant"}},
    }))
    cfg = load_stage_config(stage)
    root = tmp_path / "run"
    torch.manual_seed(0)
    from keye.models import build_model

    start = build_model("keye-nano").state_dict()  # what load_start builds: the variant seeded with run.seed
    run_stage(cfg, root)
    losses = [r["loss"] for r in read_metrics(root / "text" / "metrics.jsonl")]
    assert np.mean(losses[-2:]) < 0.8 * np.mean(losses[:2])
    from transformers import AutoModelForImageTextToText

    after = AutoModelForImageTextToText.from_pretrained(root / "text" / "model").state_dict()
    changed = {group_of(k) for k in start if not torch.equal(start[k], after[k])}
    assert changed == {"lm"}

    # the text oracle scores exactly the questions of seed 0's val / test files (generated here to compare)
    generate_world(tmp_path / "world0", WorldConfig(seed=0, clips={"train": 0, "val": 1, "test": 2}), progress=False)
    rows = [json.loads(line) for split in ("val", "test")
            for line in (tmp_path / "world0" / f"{split}.jsonl").read_text().splitlines()]
    scores = json.loads((root / "text" / "eval.json").read_text())
    assert scores["text_oracle"]["n"] == len(rows)
    assert set(scores["text_oracle"]["per_kind"]) == {r["kind"] for r in rows}
    assert scores["lookup"]["n"] == 10 and 0 < scores["lookup"]["first_listed"] < 1
