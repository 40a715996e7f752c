"""``keye demo`` (the README's main command) on a tiny version of the nano recipe: it trains every stage,
evaluates, and answers questions about a held-out clip; a second run reuses everything."""

import shutil
from pathlib import Path

import yaml

from keye.cli import main

NANO = Path(__file__).resolve().parents[1] / "pipelines" / "nano"
TINY = ["video.min_pixels=3136", "video.max_pixels=3136", "run.micro_batch=2", "run.steps=2", "data.max_samples=4"]


def test_demo_trains_every_stage_then_answers(tmp_path, capsys):
    recipe = tmp_path / "recipe"
    shutil.copytree(NANO, recipe)
    config = yaml.safe_load((recipe / "recipe.yaml").read_text())
    config["world"] = {"seed": 1, "clips": {"train": 4, "val": 0, "test": 1}, "scene": {"height": 56, "width": 56},
                       "crop_size": 56}
    config["eval"] = [{"split": "world/test.jsonl", "mode": "no_think", "max_new_tokens": 4}]
    (recipe / "recipe.yaml").write_text(yaml.safe_dump(config))
    root = tmp_path / "run"

    assert main(["demo", *TINY, "--recipe", str(recipe), "--run-root", str(root), "--modes", "no_think"]) == 0
    out = capsys.readouterr().out
    stages = [Path(s).stem for s in config["stages"]]
    assert all((root / s / "done.json").is_file() for s in stages)
    test_rows = (root / "world" / "test.jsonl").read_text().splitlines()
    assert out.count("reference:") == len(test_rows)  # every question about the one held-out clip
    assert "held-out accuracy" in out and "test-no_think" in out

    marker = (root / stages[-1] / "done.json").stat().st_mtime_ns
    assert main(["demo", *TINY, "--recipe", str(recipe), "--run-root", str(root), "--modes", "no_think"]) == 0
    assert (root / stages[-1] / "done.json").stat().st_mtime_ns == marker  # nothing retrained
