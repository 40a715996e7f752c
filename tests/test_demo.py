"""``keye demo --smoke`` (the README's main command, on the recipe's smoke overrides): it generates the
world, trains every stage, evaluates, and answers questions about a held-out clip; a second run reuses
everything; a typo in an override fails before any work."""

from pathlib import Path

import yaml

from keye.cli import main

NANO = Path(__file__).resolve().parents[1] / "pipelines" / "nano"


def test_demo_trains_every_stage_then_answers(tmp_path, capsys):
    root = tmp_path / "run"
    assert main(["demo", "--smoke", "--run-root", str(root), "--modes", "no_think"]) == 0
    out = capsys.readouterr().out
    stages = [Path(s).stem for s in yaml.safe_load((NANO / "recipe.yaml").read_text())["stages"]]
    assert all((root / s / "done.json").is_file() for s in stages)
    assert yaml.safe_load((root / "stage2_multitask" / "config.yaml").read_text())["run"]["steps"] == 2  # smoke-sized
    assert len(list((root / "world" / "videos").glob("train-*.mp4"))) == 8
    test_rows = (root / "world" / "test.jsonl").read_text().splitlines()
    asked = out.count("reference:")
    assert 0 < asked < len(test_rows) and "held-out accuracy" in out and "test-no_think" in out  # one of two clips

    marker = (root / stages[-1] / "done.json").stat().st_mtime_ns
    assert main(["demo", "--smoke", "--run-root", str(root), "--modes", "no_think"]) == 0
    assert (root / stages[-1] / "done.json").stat().st_mtime_ns == marker  # nothing retrained
    assert main(["demo", "--smoke", "--run-root", str(tmp_path / "typo"), "run.stepz=1"]) == 2
    assert "run.stepz" in capsys.readouterr().err and not (tmp_path / "typo").exists()
