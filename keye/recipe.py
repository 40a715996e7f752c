"""Recipes: a folder of stage files run in order (``keye train pipelines/nano``).

``recipe.yaml`` names the stages in order, the synthetic world to generate first (if any), the held-out
evaluations to run on the last stage's model and the hardware the recipe is meant for. Each stage file is
parsed with the config class of the stage its ``stage:`` key names (``keye.train.stages``). Stages chain:
each starts from the folder the previous one wrote, so skipping a stage (``--skip``, for ablations) makes the
next one start where the skipped one would have; the first stage starts from its own ``init_from`` (or a
fresh model), and when it is skipped the next one starts from that ``init_from``. A stage that already finished
(its ``done.json`` is there) is not run again, so a recipe killed half-way resumes with the stage it was in, and
that stage resumes from its last checkpoint. A recipe that ships a pretrained start can also continue from the
shipped one (``from_shipped``): the stages its provenance records are not run again, and the first stage after
them starts from its weights.

Overrides are ``key=value`` with dotted keys, routed by their first part: a recipe key (``world.seed=1``,
``run_root=...``) goes to the recipe, a stage's file name (``sft.run.steps=5``) to that stage alone, and any
other key to every stage whose config takes it (``run.steps=5`` to all; ``siglip_regions=1`` to stage 0). A
key no stage takes is an error before any work starts.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from keye.config import from_dict, has_key, read_config_data, split_override
from keye.errors import ConfigError
from keye.fileio import atomic_write_text, run_lock
from keye.train.base import StageConfig
from keye.train.stages import get_stage

log = logging.getLogger(__name__)
DONE = "done.json"
SPENT = "seconds.json"  # wall time of a stage's earlier processes that stopped before it finished
RECIPE_FILE = "recipe.yaml"


@dataclass
class EvalSpec:
    split: str = "world/test.jsonl"  # relative to the run folder
    mode: str = "no_think"  # "think", "no_think" or "auto"
    max_new_tokens: int = 48
    limit: int | None = None
    batch_size: int = 16  # questions generated together (greedy: the same answers as one by one)


@dataclass
class RecipeConfig:
    stages: list[str] = field(default_factory=list)  # stage files in this folder, in order
    run_root: str = "runs/nano"
    world: dict[str, Any] | None = None  # keye.data.world.WorldConfig fields; generated into <run_root>/world
    gpus_per_node: int = 1  # the hardware the recipe is sized for (dry-run memory estimates)
    nodes: int = 1
    eval: list[EvalSpec] = field(default_factory=list)  # run on the last stage's model when the recipe ends
    pretrained: str | None = None  # the shipped start this recipe reproduces (`keye train FOLDER --ship`)
    # what --smoke adds: overrides that run the whole recipe end to end in a few minutes on 2 CPU cores,
    # into <run_root>-smoke
    smoke: list[str] = field(default_factory=list)


@dataclass
class Recipe:
    """A recipe folder, resolved: its config and every stage file parsed with its overrides (unchained)."""

    config: RecipeConfig
    folder: Path
    stages: list[StageConfig]
    names: list[str]  # each stage's name in the recipe: its file's name without .yaml

    def chained(self, skip: list[str] = ()) -> list[StageConfig]:
        """The stages not skipped, each starting from the one before it; the first from its own ``init_from``, or
        from a skipped first stage's (skipping stage 0 of a recipe that starts from a pretrained model keeps
        that start)."""
        unknown = set(skip) - set(self.names)
        if unknown:
            raise ConfigError(f"--skip: no stage named {sorted(unknown)[0]!r} (stages: {self.names})")
        configs: list[StageConfig] = []
        for name, cfg in zip(self.names, self.stages):
            if name in skip:
                continue
            # the first stage run starts where the recipe's first stage would have, skipped or not
            init = configs[-1].out if configs else self.stages[0].init_from
            configs.append(dataclasses.replace(cfg, init_from=init))
        return configs


def load_stage_config(path: str | os.PathLike, overrides: list[str] = ()) -> StageConfig:
    """A stage file parsed strictly with the config class of the stage its ``stage:`` key names."""
    path = Path(path)
    data = read_config_data(path, list(overrides))
    stage = get_stage(str(data.get("stage", "")), source=str(path))
    cfg = from_dict(stage.config, data, source=str(path))
    cfg.out = cfg.out or path.stem
    return cfg


def load_recipe(folder: str | os.PathLike, overrides: list[str] = (), smoke: bool = False) -> Recipe:
    """Read ``recipe.yaml`` and every stage file it names, routing ``overrides`` (see the module docstring).
    ``smoke``: the recipe's ``smoke`` overrides first (``overrides`` still win), into ``<run_root>-smoke``."""
    folder = Path(folder)
    path = folder / RECIPE_FILE
    if not path.is_file():
        raise ConfigError(f"{folder}: not a recipe folder (no {RECIPE_FILE})")
    base = from_dict(RecipeConfig, read_config_data(path), source=str(path))
    if smoke:
        if not base.smoke:
            raise ConfigError(f"{path}: --smoke needs the recipe's 'smoke' overrides, and it lists none")
        overrides = [*base.smoke, f"run_root={base.run_root}-smoke", *overrides]
    stage_files = [folder / name for name in base.stages]
    for file in stage_files:
        if not file.is_file():
            raise ConfigError(f"{path}: stage file {file.name!r} not found in {file.parent}")
    names = [file.stem for file in stage_files]
    classes = [get_stage(str(read_config_data(file).get("stage", "")), source=str(file)).config for file in stage_files]
    recipe_overrides, per_stage = route_overrides(overrides, names, classes)
    config = from_dict(RecipeConfig, read_config_data(path, recipe_overrides), source=str(path)) if recipe_overrides else base
    stages = [load_stage_config(file, per_stage[name]) for file, name in zip(stage_files, names)]
    return Recipe(config, folder, stages, names)


def route_overrides(overrides: list[str], names: list[str], classes: list[type]) -> tuple[list[str], dict[str, list[str]]]:
    """(the recipe's overrides, each stage's) from recipe-wide ``key=value`` overrides."""
    recipe: list[str] = []
    per_stage: dict[str, list[str]] = {name: [] for name in names}
    for item in overrides:
        key, value = split_override(item)
        head, _, rest = key.partition(".")
        if head in per_stage and rest:
            per_stage[head].append(f"{rest}={value}")
        elif head not in ("stages", "smoke") and has_key(RecipeConfig, key):
            recipe.append(item)
        else:
            takers = [name for name, cls in zip(names, classes) if has_key(cls, key)]
            if not takers:
                raise ConfigError(f"override {key!r}: no stage of the recipe takes it, and it is no recipe key "
                                  f"({', '.join(f.name for f in dataclasses.fields(RecipeConfig))}); prefix a stage's "
                                  f"name to aim at one stage (stages: {', '.join(names)})")
            for name in takers:
                per_stage[name].append(item)
    return recipe, per_stage


def load_recipe_stage(path: str | os.PathLike, overrides: list[str] = ()) -> StageConfig:
    """One stage file, chained like ``run_recipe`` chains it: a stage of a recipe folder starts from the
    stage before it in ``recipe.yaml`` (its folder in the run root) unless ``init_from`` is overridden.
    A stage file outside a recipe, or the recipe's first stage, keeps its own ``init_from``."""
    path = Path(path)
    cfg = load_stage_config(path, list(overrides))
    if cfg.init_from or any(split_override(o)[0] == "init_from" for o in overrides):
        return cfg
    recipe = _recipe_of(path)
    if recipe is None:
        return cfg
    files = [(recipe.folder / name).resolve() for name in recipe.config.stages]  # names may reach into other folders
    index = files.index(path.resolve())
    if index == 0:
        return cfg
    previous = recipe.stages[index - 1].out  # its own name: out= renames this stage only
    log.info("%s: starts from %s, the stage before it in %s (override with init_from=...)", cfg.out, previous,
             recipe.folder / RECIPE_FILE)
    return dataclasses.replace(cfg, init_from=previous)


def stage_run_root(path: str | os.PathLike) -> Path:
    """Where a stage file's relative paths point: its recipe's run folder, else ``runs/nano``."""
    recipe = _recipe_of(Path(path))
    return Path(recipe.config.run_root if recipe is not None else RecipeConfig.run_root)


def _recipe_of(path: Path) -> Recipe | None:
    """The recipe in the stage file's folder, if that folder is one and lists the file."""
    if not (path.parent / RECIPE_FILE).is_file():
        return None
    recipe = load_recipe(path.parent)
    files = [(recipe.folder / name).resolve() for name in recipe.config.stages]
    return recipe if path.resolve() in files else None


# ----------------------------------------------------------------------------- running


def run_stage(cfg: StageConfig, run_root: Path) -> Path:
    """Run one stage unless it already finished; returns its folder. ``done.json`` holds the seconds the
    stage took, over every process that ran it (one killed outright adds nothing: it could not write)."""
    stage = get_stage(cfg.stage)
    out_dir = run_root / cfg.out
    if (out_dir / DONE).is_file():
        log.info("%s: already done, skipping", cfg.out)
        return out_dir
    started = time.time()
    with run_lock(out_dir):
        earlier = json.loads((out_dir / SPENT).read_text())["seconds"] if (out_dir / SPENT).is_file() else 0.0
        try:
            stage.run(cfg, run_root)
        except BaseException:  # Ctrl-C or a crash: the resumed run adds this process's time to its own
            if out_dir.is_dir():
                _write_json(out_dir / SPENT, {"seconds": round(earlier + time.time() - started, 1)})
            raise
    _write_json(out_dir / DONE, {"stage": cfg.stage, "seconds": round(earlier + time.time() - started, 1)})
    (out_dir / SPENT).unlink(missing_ok=True)
    return out_dir


def run_recipe(folder: str | os.PathLike, run_root: str | None = None, overrides: list[str] = (),
               skip: list[str] = (), smoke: bool = False, from_shipped: bool = False) -> Path:
    """Generate the world (if the recipe has one), then run every stage not skipped, then the recipe's
    held-out evaluations on the last stage's model. ``from_shipped``: continue the recipe's shipped start
    instead of running the stages it holds (``shipped_stages``). Returns the run folder."""
    recipe = load_recipe(folder, list(overrides), smoke)  # a typo fails before any work
    if from_shipped:
        held = shipped_stages(recipe)
        configs = recipe.chained([*skip, *held])
        if not configs:
            raise ConfigError(f"--from-shipped: the shipped {recipe.config.pretrained} holds every stage of "
                              f"{recipe.folder} ({', '.join(held)}); nothing is left to run")
        log.info("%s: stages %s are the shipped %s's; %s starts from its weights", recipe.folder, ", ".join(held),
                 recipe.config.pretrained, configs[0].out)
        configs[0] = dataclasses.replace(configs[0], init_from=recipe.config.pretrained)
    else:
        configs = recipe.chained(list(skip))
    root = Path(run_root or recipe.config.run_root)
    with run_lock(root):  # a second run into the same folder stops here, before it writes anything
        if recipe.config.world is not None:
            from keye.data.world import WorldConfig, generate_world

            generate_world(root / "world", WorldConfig.from_dict(recipe.config.world), progress=True)
        for cfg in configs:
            run_stage(cfg, root)
        if recipe.config.eval and configs:
            evaluate_stage(configs[-1], root, recipe.config.eval)
    return root


def shipped_stages(recipe: Recipe) -> list[str]:
    """The stages of ``recipe`` that its shipped pretrained start holds: those its provenance records, which
    must be the recipe's first stages, in order (its weights checked against their SHA-256 first)."""
    from keye.models.pretrained import verify_pretrained

    name = recipe.config.pretrained
    if not name:
        raise ConfigError(f"{recipe.folder / RECIPE_FILE}: names no 'pretrained' start to continue from")
    records = verify_pretrained(name)["stages"]
    held = [record["stage"] for record in records]
    if held != recipe.names[: len(held)]:
        raise ConfigError(f"the shipped {name} holds stages {held}, which are not the first stages of "
                          f"{recipe.folder / RECIPE_FILE} ({recipe.names}); retrain it whole")
    for record, cfg in zip(records, recipe.stages):
        if (record["seed"], record["steps"]) != (cfg.run.seed, cfg.run.steps):
            raise ConfigError(f"the shipped {name}'s stage {record['stage']} ran seed {record['seed']} for "
                              f"{record['steps']} steps, the recipe's runs seed {cfg.run.seed} for {cfg.run.steps}; "
                              f"retrain it whole")
    return held


def evaluate_stage(cfg: StageConfig, run_root: Path, specs: list[EvalSpec]) -> dict[str, Any]:
    """Held-out accuracy of a finished stage's model, seeing frames the way the stage trained on them.
    Results (resumable, per item) land in ``<stage>/eval/<split>-<mode>/``; a summary in ``eval.json``."""
    from keye.api import load
    from keye.eval.runner import evaluate_world
    from keye.train.session import resolve_device

    # fp32 on the stage's device: greedy answers then match what the stage's own numbers were
    pipe = load(run_root / cfg.out / "model", device=resolve_device(cfg.run.device), dtype="float32",
                slow_fast=cfg.video.slow_fast)
    summary = {}
    for spec in specs:
        name = f"{Path(spec.split).stem}-{spec.mode}"
        results = evaluate_world(
            pipe, run_root / spec.split, out_dir=run_root / cfg.out / "eval" / name, mode=spec.mode,
            max_new_tokens=spec.max_new_tokens, video_options=cfg.video.message(),
            slow_fast=cfg.video.slow_fast, limit=spec.limit, batch_size=spec.batch_size, progress=True,
        )
        overall = results["overall"]
        summary[name] = {"accuracy": overall["accuracy"], "n": overall["n"], "per_kind": results["per_kind"]}
        log.info("%s %s: accuracy %.3f over %d", cfg.out, name, overall["accuracy"], overall["n"])
    _write_json(run_root / cfg.out / "eval.json", summary)
    return summary


# ----------------------------------------------------------------------------- dry run


def dry_run(folder: str | os.PathLike, overrides: list[str] = ()) -> list[dict[str, Any]]:
    """Build each stage's model on the meta device and estimate per-GPU memory; prints a table."""
    recipe = load_recipe(folder, list(overrides))
    gpus = recipe.config.gpus_per_node * recipe.config.nodes
    rows = [estimate_stage(cfg, gpus) for cfg in recipe.chained()]
    _print_estimates(rows, recipe.config)
    return rows


# the share of a row's tokens that are vision pads (each merged from 4 ViT patches), for the activation estimate
VISION_SHARE = 0.5


def estimate_stage(cfg: StageConfig, gpus: int) -> dict[str, Any]:
    """Parameter counts and per-GPU memory (bytes): weights, gradients, optimizer states, gathered weights and
    activations, for the stage's strategy and switches, as the toolkit trains.

    Weights and gradients are float32 (4 + 4 bytes; ``run.precision: bf16`` is autocast), AdamW keeps two
    float32 moments (8 bytes) per trainable parameter. ZeRO-1 shards the moments, ZeRO-2 also the gradients,
    ZeRO-3 / FSDP2 everything; those two gather the root's weights and two blocks' at a time. Activations are
    ``keye.models.memory.activation_plan`` for one micro-batch: LM stages with ``max_length`` take one packed row
    of that many tokens (``packing``) or ``run.micro_batch`` padded rows, ``VISION_SHARE`` of them vision pads,
    every position supervised (an upper bound on the loss), with ``run.activation_checkpointing``,
    ``loss_chunk`` and ``run.precision``. Other stages report weights, gradients and states only."""
    from keye.models import build_model
    from keye.models.memory import activation_plan
    from keye.train.optim import GROUP_PREFIXES, apply_freeze_plan, group_of

    with torch.device("meta"):
        model = build_model(cfg.model)
    trainable = apply_freeze_plan(model, cfg.train)
    total = {g: 0 for g in GROUP_PREFIXES}
    for name, p in model.named_parameters():
        total[group_of(name)] += p.numel()
    n_all, n_train = sum(total.values()), sum(trainable.values())
    zero = _zero_stage(cfg)
    shard = lambda x, on: x / gpus if on else x  # noqa: E731
    blocks = [m for m in model.modules() if type(m).__name__ in model._no_split_modules]
    block = max(sum(p.numel() for p in m.parameters()) for m in blocks)
    root = n_all - sum(p.numel() for m in blocks for p in m.parameters())
    row = {
        "stage": cfg.out, "model": cfg.model, "strategy": cfg.run.dist.strategy, "zero": zero, "gpus": gpus,
        "params": n_all, "trainable": n_train, "by_group": {g: n for g, n in total.items() if n},
        "weights": shard(4 * n_all, zero >= 3), "grads": shard(4 * n_train, zero >= 2),
        "optimizer": shard(8 * n_train, zero >= 1), "gathered": 4 * (root + 2 * block) if zero >= 3 else 0,
        "tokens": None, "activations": None,
    }
    max_length = getattr(cfg, "max_length", None)
    if max_length:
        tokens = max_length * (1 if getattr(cfg, "packing", False) else cfg.run.micro_batch)
        vision_trains = "vision" in cfg.train and model.config.vision_mode == "continuous"
        plan = activation_plan(model.config, tokens, precision=cfg.run.precision,
                               checkpointing=cfg.run.activation_checkpointing,
                               loss_chunk=getattr(cfg, "loss_chunk", 0),
                               patches=int(4 * VISION_SHARE * tokens) if vision_trains else 0)
        row |= {"tokens": tokens, "activations": plan.total, "activation_parts": plan.__dict__}
    row["total"] = sum(row[k] or 0 for k in ("weights", "grads", "optimizer", "gathered", "activations"))
    row["gib_per_gpu"] = row["total"] / 2**30
    return row


def _zero_stage(cfg: StageConfig) -> int:
    dist = cfg.run.dist
    if dist.strategy == "fsdp2":
        return 3
    if dist.strategy == "deepspeed" and dist.deepspeed_config:
        path = Path(dist.deepspeed_config)
        if not path.is_file():
            raise ConfigError(f"{cfg.out}: run.dist.deepspeed_config {path} not found")
        return int(json.loads(path.read_text()).get("zero_optimization", {}).get("stage", 0))
    return 0


def _print_estimates(rows: list[dict[str, Any]], recipe: RecipeConfig) -> None:
    gib = lambda x: f"{x / 2**30:.1f}" if x is not None else "-"  # noqa: E731
    print(f"dry run: {recipe.nodes} node(s) x {recipe.gpus_per_node} GPU(s); GiB per GPU. Activations: one "
          f"micro-batch at the stage's max_length, {VISION_SHARE:.0%} vision tokens, every position supervised")
    print(f"{'stage':<18}{'strategy':<12}{'params':>9}{'train':>9}{'tokens':>8}{'weights':>9}{'grads':>7}"
          f"{'optim':>7}{'gather':>8}{'activ':>7}{'GiB/GPU':>9}")
    for r in rows:
        strategy = f"{r['strategy']}" + (f"/z{r['zero']}" if r["strategy"] == "deepspeed" else "")
        print(f"{r['stage']:<18}{strategy:<12}{r['params'] / 1e9:>8.2f}B{r['trainable'] / 1e9:>8.2f}B"
              f"{r['tokens'] or '-':>8}{gib(r['weights']):>9}{gib(r['grads']):>7}{gib(r['optimizer']):>7}"
              f"{gib(r['gathered']):>8}{gib(r['activations']):>7}{r['gib_per_gpu']:>9.1f}")


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1))
