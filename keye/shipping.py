"""A finished recipe run shipped as a pretrained start (``keye train pipelines/nano-base --ship``).

The run's last model folder is copied into the package (``keye.models.pretrained``, under the name the
recipe's ``pretrained`` key gives) beside ``provenance.json``: the recipe and the command that reproduce it,
each stage's seed, steps, time and end-of-stage figures, the world version, the first logged losses (a
rerun from the same seed must match them) and every file's size and SHA-256. The copy replaces the folder
whole or not at all.
"""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

import torch
import yaml

from keye.data.world.generate import WORLD_VERSION
from keye.errors import ConfigError
from keye.fileio import atomic_folder, sha256_file
from keye.models.pretrained import PRETRAINED, PROVENANCE, verify_pretrained
from keye.recipe import DONE, load_recipe
from keye.train.base import MODEL_DIR
from keye.train.metrics import read_metrics
from keye.train.session import FIRST_LOGGED


def ship_pretrained(folder: str | Path, run_root: str | Path | None = None, command: str | None = None) -> Path:
    """Copy the finished run of recipe ``folder`` (in ``run_root``, default the recipe's) into the package
    as its ``pretrained`` start; returns the shipped folder."""
    recipe = load_recipe(folder)
    name = recipe.config.pretrained
    if not name:
        raise ConfigError(f"{Path(folder) / 'recipe.yaml'}: names no 'pretrained' start to ship")
    if name not in PRETRAINED:
        raise ConfigError(f"pretrained: {name!r} has no place in keye.models.pretrained ({', '.join(PRETRAINED)})")
    root = Path(run_root or recipe.config.run_root)
    configs = recipe.chained()
    finished = [(root / cfg.out / DONE).is_file() for cfg in configs]
    # a run that continued the shipped start (`--from-shipped`) holds only the stages after the shipped ones
    held_records = [] if all(finished) else _continued_from_shipped(recipe, root, configs, finished)
    held = [record["stage"] for record in held_records]
    unfinished = [cfg.out for stage, cfg, done in zip(recipe.names, configs, finished)
                  if not done and stage not in held]
    if unfinished:
        raise ConfigError(f"{root / unfinished[0]}: stage not finished; `keye train {folder}` first")
    records = [_stage_record(stage, root / cfg.out) for stage, cfg in zip(recipe.names, configs) if stage not in held]
    provenance = {
        "name": name,
        "recipe": Path(folder).as_posix(),
        "command": command or f"keye train {Path(folder).as_posix()}{' --from-shipped' if held else ''} --ship",
        "world_version": WORLD_VERSION,
        "world": recipe.config.world,  # the recipe's generated world (the text stages draw their own clips)
        "stages": [*held_records, *records],
        "torch": torch.__version__,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
    }
    if held:
        provenance["resumed"] = (f"stages {', '.join(held)} are those of the {name} shipped before (each with the "
                                 f"machine it ran on); the rest ran from its weights, on the machine above")
    return _replace_folder(PRETRAINED[name], root / configs[-1].out / MODEL_DIR, provenance)


def _continued_from_shipped(recipe, root: Path, configs: list, finished: list[bool]) -> list[dict]:
    """The shipped start's records of the stages a run in ``root`` took from it, each naming the machine and
    torch it ran on: none unless the run's first finished stage started from the shipped weights and every stage
    before it is one that start holds."""
    if not any(finished):
        return []
    first = finished.index(True)
    started = yaml.safe_load((root / configs[first].out / "config.yaml").read_text()).get("init_from")
    if started != recipe.config.pretrained:
        return []
    provenance = verify_pretrained(started)
    if [record["stage"] for record in provenance["stages"]] != recipe.names[:first]:
        return []
    where = f"{provenance['machine']}, torch {provenance['torch']}"
    return [{**record, "machine": record.get("machine", where)} for record in provenance["stages"]]


def _stage_record(name: str, out_dir: Path) -> dict:
    """What stage ``name`` ran (its resolved config as the run saved it, overrides included) and logged."""
    cfg = yaml.safe_load((out_dir / "config.yaml").read_text())
    rows = read_metrics(out_dir / "metrics.jsonl")
    logged = [r for r in rows if "loss" in r]  # training steps; run.eval_every adds rows of held-out figures
    record = {
        "stage": name,
        "kind": cfg["stage"],
        "seed": cfg["run"]["seed"],
        "steps": cfg["run"]["steps"],
        "micro_batch": cfg["run"]["micro_batch"],
        "seconds": json.loads((out_dir / DONE).read_text()).get("seconds"),
        "first_losses": [{"step": r["step"], "loss": r["loss"]} for r in logged[:FIRST_LOGGED]],
        "last_loss": {"step": logged[-1]["step"], "loss": logged[-1]["loss"]} if logged else None,
    }
    curve = [{k: v for k, v in r.items() if k == "step" or (k.startswith("eval_") and "/" not in k)}
             for r in rows if "loss" not in r and any(k.startswith("eval_") for k in r)]
    if curve:
        record["eval_curve"] = curve
    if "world" in cfg:
        record["world"] = cfg["world"]
    if (out_dir / "eval.json").is_file():
        record["eval"] = json.loads((out_dir / "eval.json").read_text())
    return record


def _replace_folder(target: Path, model_dir: Path, provenance: dict) -> Path:
    with atomic_folder(target) as staging:
        shutil.copytree(model_dir, staging, dirs_exist_ok=True)
        files = sorted(p for p in staging.iterdir() if p.is_file())
        for p in files:
            p.chmod(0o644)  # saved weights are private to their writer; a package's files are for every user
        provenance["sha256"] = {p.name: sha256_file(p) for p in files}
        provenance["bytes"] = sum(p.stat().st_size for p in files)
        (staging / PROVENANCE).write_text(json.dumps(provenance, indent=1) + "\n")
    return target
