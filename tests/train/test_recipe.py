"""Recipes and the stage registry: each stage file is parsed with its own stage's config class, overrides are
routed to the stages that take them, RL joins a recipe like any stage, and a new stage is one registration."""

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from keye.errors import ConfigError
from keye.recipe import load_recipe, load_stage_config, run_recipe
from keye.train.base import STAGES, StageConfig, register_stage
from keye.train.stages.lm import AnnealConfig, LMStageConfig
from keye.train.stages.rl import RLConfig
from keye.train.stages.vit import VitConfig

ROOT = Path(__file__).resolve().parents[2]
NANO = ROOT / "pipelines" / "nano"


def test_each_stage_file_is_parsed_with_its_own_config_class():
    recipe = load_recipe(NANO)
    assert [type(c) for c in recipe.stages] == [VitConfig, LMStageConfig, LMStageConfig, AnnealConfig, LMStageConfig]
    assert type(load_stage_config(NANO / "rl.yaml")) is RLConfig


def test_a_key_the_stage_does_not_read_is_an_error_naming_file_key_and_keys(tmp_path):
    sft = tmp_path / "sft.yaml"
    sft.write_text((NANO / "sft.yaml").read_text() + "siglip_regions: 1.0\n")  # a stage-0 key in an SFT file
    with pytest.raises(ConfigError) as err:
        load_stage_config(sft)
    message = str(err.value)
    assert str(sft) in message and "'siglip_regions'" in message and "max_length" in message and "lora" in message
    sft.write_text("stage: sfft\n")
    with pytest.raises(ConfigError, match=r"sft.yaml: stage 'sfft' is not one of .*'?align.*rl.*sft.*vq"):
        load_stage_config(sft)


def test_recipe_overrides_reach_the_stages_that_take_them():
    recipe = load_recipe(NANO, ["run.steps=3", "sft.run.steps=5", "siglip_regions=0.5", "world.seed=7",
                                "stage2_multitask.data.max_samples=4"])
    by_name = dict(zip(recipe.names, recipe.stages))
    assert {name: cfg.run.steps for name, cfg in by_name.items()} == {
        "stage0_vit": 3, "stage1_align": 3, "stage2_multitask": 3, "stage3_anneal": 3, "sft": 5}
    assert by_name["stage0_vit"].siglip_regions == 0.5  # the only stage that takes it
    assert by_name["stage2_multitask"].data.max_samples == 4 and by_name["sft"].data.max_samples is None
    assert recipe.config.world["seed"] == 7 and recipe.config.world["clips"]["train"] == 2000
    with pytest.raises(ConfigError, match=r"override 'run.stepz': no stage of the recipe takes it.*stage0_vit"):
        load_recipe(NANO, ["run.stepz=3"])
    with pytest.raises(ConfigError, match=r"sft.yaml: unknown key 'run.stepz'"):
        load_recipe(NANO, ["sft.run.stepz=3"])  # aimed at one stage: strict there


def test_rl_is_a_stage_of_a_recipe_and_chains_from_the_stage_before_it(tmp_path):
    for name in ("sft.yaml", "rl.yaml"):
        shutil.copy(NANO / name, tmp_path / name)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"stages": ["sft.yaml", "rl.yaml"], "run_root": "runs/x"}))
    recipe = load_recipe(tmp_path, ["rollout.group_size=4"])
    sft, rl = recipe.chained()
    assert type(rl) is RLConfig and rl.init_from == "sft" and rl.rollout.group_size == 4
    # skipping the first stage, the next starts where it would have: RL on the model SFT would have tuned
    assert sft.init_from is None and recipe.chained(skip=["sft"])[0].init_from is None  # a fresh model, as SFT's
    nano = load_recipe(NANO)  # stage 0 starts from the shipped base; without it, stage 1 must too
    assert nano.chained(skip=["stage0_vit"])[0].init_from == "keye-nano-base"
    assert nano.chained(skip=["stage0_vit", "stage1_align"])[0].init_from == "keye-nano-base"
    with pytest.raises(ConfigError, match="rollout.group_size must be >= 2"):
        load_recipe(tmp_path, ["rl.rollout.group_size=1"])


@dataclass
class CountingConfig(StageConfig):
    """A toy stage: writes how many training rows it read, times ``factor``."""

    factor: int = 1


def test_a_new_stage_is_one_registration(tmp_path):
    """What the README's "adding a stage" paragraph promises: a config class and a registered run function,
    and recipes run it, strict about its keys, chained like the built-in stages."""
    from keye.train.base import read_rows

    @register_stage("counting", CountingConfig)
    def run_counting(cfg: CountingConfig, run_root: Path) -> Path:
        rows, _ = read_rows(cfg.data.train, run_root)
        out = run_root / cfg.out
        out.mkdir(parents=True, exist_ok=True)
        (out / "count.json").write_text(json.dumps({"rows": cfg.factor * len(rows), "init_from": cfg.init_from}))
        return out

    try:
        (tmp_path / "data.jsonl").write_text('{"id": 1}\n{"id": 2}\n{"id": 3}\n')
        for name in ("first", "second"):
            (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({"stage": "counting", "data": {"train": ["data.jsonl"]}}))
        (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"stages": ["first.yaml", "second.yaml"]}))
        root = tmp_path / "run"
        (root).mkdir()
        shutil.copy(tmp_path / "data.jsonl", root / "data.jsonl")
        run_recipe(tmp_path, str(root), ["second.factor=10"])
        assert json.loads((root / "first" / "count.json").read_text()) == {"rows": 3, "init_from": None}
        assert json.loads((root / "second" / "count.json").read_text()) == {"rows": 30, "init_from": "first"}
        assert (root / "second" / "done.json").is_file()
        with pytest.raises(ConfigError, match="unknown key 'siglip_frames'"):
            load_recipe(tmp_path, ["second.siglip_frames=2"])
    finally:
        STAGES.pop("counting")


def test_video_options_of_a_stage_are_validated_when_read():
    with pytest.raises(ConfigError, match=r"stage1_align.yaml.*video: fps must be > 0"):
        load_stage_config(NANO / "stage1_align.yaml", ["video.fps=-1"])
    with pytest.raises(ConfigError, match="unknown key 'video.total_pixel'"):
        load_stage_config(NANO / "stage1_align.yaml", ["video.total_pixel=1000"])
    cfg = load_stage_config(NANO / "stage1_align.yaml", ["video.total_pixels=784000"])
    assert cfg.video.message() == {"min_pixels": 12544, "max_pixels": 12544, "total_pixels": 784000, "fps": 2.0}
    assert dataclasses.replace(cfg.video, fps=None).message().keys() == {"min_pixels", "max_pixels", "total_pixels"}


def test_done_json_counts_the_seconds_of_every_process_that_ran_the_stage(tmp_path, monkeypatch):
    """A stage stopped once (Ctrl-C, a crash) and resumed reports both processes' time (7 s, then 5 s on the
    recipe's clock) and leaves no partial tally behind."""
    from types import SimpleNamespace

    import keye.recipe

    now = {"s": 100.0, "runs": 0}
    monkeypatch.setattr(keye.recipe, "time", SimpleNamespace(time=lambda: now["s"]))

    @register_stage("flaky", CountingConfig)
    def run_flaky(cfg: CountingConfig, run_root: Path) -> Path:
        (run_root / cfg.out).mkdir(parents=True, exist_ok=True)
        now["runs"] += 1
        if now["runs"] == 1:
            now["s"] += 7
            raise KeyboardInterrupt
        now["s"] += 5
        return run_root / cfg.out

    try:
        (tmp_path / "flaky.yaml").write_text(yaml.safe_dump({"stage": "flaky"}))
        cfg = keye.recipe.load_stage_config(tmp_path / "flaky.yaml")
        with pytest.raises(KeyboardInterrupt):
            keye.recipe.run_stage(cfg, tmp_path)
        assert json.loads((tmp_path / "flaky" / "seconds.json").read_text()) == {"seconds": 7.0}
        now["s"] += 1000  # the pause between the two processes does not count
        keye.recipe.run_stage(cfg, tmp_path)
        assert json.loads((tmp_path / "flaky" / "done.json").read_text()) == {"stage": "flaky", "seconds": 12.0}
        assert not (tmp_path / "flaky" / "seconds.json").exists()
    finally:
        STAGES.pop("flaky")
