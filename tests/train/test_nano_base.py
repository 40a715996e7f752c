"""keye-nano-base, the shipped start of the nano recipe: its files against their provenance, its figures
against a fresh measurement, a rerun of its recipe's first steps against its logged losses, and the
shipping itself on a smoke run."""

import json
import shutil

import pytest
import torch

import keye.models.pretrained as pretrained
from keye.data.world.generate import WORLD_VERSION
from keye.errors import ConfigError, KeyeInputError
from keye.recipe import load_recipe, load_stage_config, run_recipe, run_stage
from keye.shipping import ship_pretrained
from keye.train.metrics import read_metrics

BASE = "keye-nano-base"


@pytest.fixture(scope="module")
def provenance():
    return pretrained.verify_pretrained(BASE)  # every shipped file against its SHA-256


def test_the_shipped_base_is_what_its_provenance_says(provenance):
    folder = pretrained.pretrained_folder(BASE)
    recipe = load_recipe(provenance["recipe"])
    assert recipe.config.pretrained == BASE and provenance["command"].startswith(f"keye train {provenance['recipe']}")
    assert [s["stage"] for s in provenance["stages"]] == recipe.names
    assert [(s["seed"], s["steps"]) for s in provenance["stages"]] == [(c.run.seed, c.run.steps) for c in recipe.stages]
    assert provenance["world_version"] == WORLD_VERSION
    files = [p for p in folder.iterdir() if p.name != pretrained.PROVENANCE]
    assert sorted(p.name for p in files) == sorted(provenance["sha256"])
    assert provenance["bytes"] == sum(p.stat().st_size for p in files) < 16 * 2**20
    assert all(p.suffix != ".bin" for p in files)  # safetensors only


def test_the_shipped_base_reads_listings_and_scores_its_recorded_lookup_figure(provenance):
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from keye.train.stages.text import lookup_accuracy, text_oracle

    folder = pretrained.pretrained_folder(BASE)
    model = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32, use_safetensors=True)
    processor = AutoProcessor.from_pretrained(folder)
    recorded = [s["eval"]["lookup"] for s in provenance["stages"] if s["kind"] == "text"][-1]  # the decoder's last
    measured = lookup_accuracy(model, processor, recorded["n"])
    assert measured["accuracy"] == pytest.approx(recorded["accuracy"], abs=1 / recorded["n"])
    # held-out clips written as text: which object is which colour / shape, read off the listing
    oracle = text_oracle(model, processor, {"val": 12})
    assert oracle["per_kind"]["color"] == oracle["per_kind"]["shape"] == 1.0


def test_keye_probe_text_oracle_reports_the_base_beside_the_worlds_majority_answers(tmp_path, capsys):
    from keye.cli import main
    from keye.data.world import WorldConfig, generate_world, guess_baselines

    assert main(["probe", "text-oracle", "--model", BASE, "--clips", "val=12", "--device", "cpu", "--json"]) == 0
    printed = capsys.readouterr().out
    reported = json.loads(printed[printed.index("{"):])
    assert reported["n"] > 12 and reported["per_kind"]["color"] == 1.0
    # the oracle asks the world's own questions: its majority answers are those of the world's val.jsonl rows
    info = generate_world(tmp_path, WorldConfig.from_dict({"seed": 0, "clips": {"train": 0, "val": 12, "test": 0}}),
                          progress=False)
    rows = [json.loads(line) for line in (tmp_path / "val.jsonl").read_text().splitlines()]
    assert len(rows) == reported["n"]
    world = guess_baselines(rows, info["answer_spaces"])
    assert reported["majority"] == pytest.approx({kind: b["majority"] for kind, b in world.items()})
    assert main(["probe", "text-oracle", "--model", BASE, "--clips", "val=0"]) == 2
    assert "--clips 'val=0'" in capsys.readouterr().err


def test_a_rerun_of_the_base_recipe_matches_its_first_logged_losses(provenance, tmp_path):
    first = provenance["stages"][0]
    steps = len(first["first_losses"])
    cfg = load_stage_config(f"{provenance['recipe']}/{first['stage']}.yaml", [
        f"run.steps={steps}", f"data.max_samples={first['steps'] * first['micro_batch']}",  # the same sample order
        "run.save_every=0", "eval_lookups=0", "eval_clips={}"])
    run_stage(cfg, tmp_path)
    rerun = read_metrics(tmp_path / cfg.out / "metrics.jsonl")
    assert [r["step"] for r in rerun] == [r["step"] for r in first["first_losses"]]
    assert [r["loss"] for r in rerun] == pytest.approx([r["loss"] for r in first["first_losses"]], rel=1e-4)


def test_keye_load_takes_the_shipped_name_and_answers_a_lookup_by_generation():
    import keye
    from keye.data.answers import is_correct
    from keye.data.world.probes import lookup_probe
    from transformers import AutoModelForImageTextToText

    pipe = keye.load(BASE, device="cpu", dtype="float32")
    shipped = AutoModelForImageTextToText.from_pretrained(pretrained.pretrained_folder(BASE), dtype=torch.float32,
                                                          use_safetensors=True).state_dict()
    weights = pipe.model.state_dict()
    assert weights.keys() == shipped.keys() and all(torch.equal(weights[k], v) for k, v in shipped.items())
    # greedy generation, the way a user asks, on colour lookups it reads off the listing; "auto": the base
    # pretrained on plain chat turns, and the think / no_think switches are SFT's to teach
    items = [p for p in lookup_probe(40) if p.kind == "color"][:8]
    answers = pipe.generate([[{"role": "user", "content": p.question}] for p in items], "auto", 4)
    assert sum(is_correct(a, p.answer) for a, p in zip(answers, items)) >= 6


def test_a_changed_shipped_file_is_named(tmp_path, monkeypatch):
    copy = tmp_path / BASE
    shutil.copytree(pretrained.pretrained_folder(BASE), copy)
    monkeypatch.setitem(pretrained.PRETRAINED, BASE, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(KeyeInputError, match="model.safetensors"):
        pretrained.verify_pretrained(BASE)


def test_shipping_a_smoke_run_replaces_the_folder_whole(tmp_path, monkeypatch):
    target = tmp_path / "assets" / BASE
    target.mkdir(parents=True)
    (target / "stale.txt").write_text("from an earlier ship")
    monkeypatch.setitem(pretrained.PRETRAINED, BASE, target)
    root = tmp_path / "run"
    with pytest.raises(ConfigError, match="not finished"):
        ship_pretrained("pipelines/nano-base", root)
    run_recipe("pipelines/nano-base", str(root), ["text.run.eval_every=1"], smoke=True)
    shipped = ship_pretrained("pipelines/nano-base", root)
    assert shipped == target and not (target / "stale.txt").exists()
    provenance = pretrained.verify_pretrained(BASE)
    for stage in provenance["stages"]:
        logged = [r for r in read_metrics(root / stage["stage"] / "metrics.jsonl") if "loss" in r]
        assert stage["first_losses"] == [{"step": r["step"], "loss": r["loss"]} for r in logged[:3]]
        assert stage["last_loss"] == {"step": logged[-1]["step"], "loss": logged[-1]["loss"]}
    text = next(s for s in provenance["stages"] if s["stage"] == "text")
    assert text["eval"] == json.loads((root / "text" / "eval.json").read_text())
    # the held-out curve of text.run.eval_every=1, the last point the final weights' figures
    assert [point["step"] for point in text["eval_curve"]] == [1, 2]
    oracle = text["eval"]["text_oracle"]
    assert text["eval_curve"][-1] == {"step": 2, "eval_text_oracle": oracle["accuracy"],
                                      "eval_text_oracle_direct": oracle["direct"]["accuracy"],
                                      "eval_lookup": text["eval"]["lookup"]["accuracy"]}
    assert all("eval_curve" not in s for s in provenance["stages"] if s["stage"] != "text")
    assert pretrained.pretrained_folder(BASE) == target


def test_a_run_from_the_shipped_start_ships_its_stages_after_the_shipped_ones(tmp_path, monkeypatch):
    """`--from-shipped`: a recipe grown by a stage runs that stage alone, from the shipped weights, and ships
    with the earlier stages' records kept as they were."""
    import yaml
    from safetensors.torch import load_file

    target = tmp_path / "assets" / BASE
    monkeypatch.setitem(pretrained.PRETRAINED, BASE, target)
    folder = tmp_path / "recipe"
    shutil.copytree("pipelines/nano-base", folder)
    recipe_file = folder / "recipe.yaml"
    full = yaml.safe_load(recipe_file.read_text())
    recipe_file.write_text(yaml.safe_dump({**full, "stages": ["lookup.yaml"]}))
    run_recipe(folder, str(tmp_path / "first"), smoke=True)
    before = ship_pretrained(folder, tmp_path / "first")
    earlier = json.loads((before / pretrained.PROVENANCE).read_text())
    weights_before = load_file(before / "model.safetensors")

    recipe_file.write_text(yaml.safe_dump({**full, "stages": ["lookup.yaml", "text.yaml"]}))
    with pytest.raises(ConfigError, match="lookup ran seed 0 for 2 steps, the recipe's runs seed 0 for 3"):
        run_recipe(folder, str(tmp_path / "bad"), ["lookup.run.steps=3"], smoke=True, from_shipped=True)
    root = tmp_path / "second"
    run_recipe(folder, str(root), smoke=True, from_shipped=True)
    assert not (root / "lookup").exists()  # the shipped start holds it
    assert yaml.safe_load((root / "text" / "config.yaml").read_text())["init_from"] == BASE
    shipped = ship_pretrained(folder, root)
    provenance = pretrained.verify_pretrained(BASE)
    assert [s["stage"] for s in provenance["stages"]] == ["lookup", "text"]
    machine = f"{earlier['machine']}, torch {earlier['torch']}"
    assert provenance["stages"][0] == {**earlier["stages"][0], "machine": machine}
    assert provenance["stages"][1]["first_losses"][0]["step"] == 1 and "machine" not in provenance["stages"][1]
    assert "--from-shipped" in provenance["command"] and "lookup" in provenance["resumed"]
    # the text stage trained the decoder of the shipped weights: its vision tower is the shipped one, unchanged
    after = load_file(shipped / "model.safetensors")
    assert after.keys() == weights_before.keys()
    assert all(torch.equal(after[k], v) for k, v in weights_before.items() if "visual" in k)
    assert any(not torch.equal(after[k], v) for k, v in weights_before.items() if "visual" not in k)
    with pytest.raises(ConfigError, match="holds every stage"):
        run_recipe(folder, str(tmp_path / "third"), smoke=True, from_shipped=True)
