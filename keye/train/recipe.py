"""Recipes: a folder of stage files run in order (``keye train pipelines/nano``).

``recipe.yaml`` names the stages in order, the synthetic world to generate first (if any) and the
hardware the recipe is meant for. Stages chain: each starts from the folder the previous one wrote,
so skipping a stage (``--skip``, for ablations) makes the next one start where the skipped one would
have. A stage that already finished (its ``done.json`` is there) is not run again, so a recipe killed
half-way resumes with the stage it was in, and that stage resumes from its last checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from keye.config import load_config
from keye.errors import ConfigError
from keye.fileio import atomic_write_text
from keye.train.common import StageConfig, load_stage_config

log = logging.getLogger(__name__)
DONE = "done.json"


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


def _stage_runners() -> dict[str, Callable[[StageConfig, Path], Path]]:
    from keye.train.pretrain import PRETRAIN_STAGES
    from keye.train.sft import run_sft
    from keye.train.vq import run_vq_stage

    return {**PRETRAIN_STAGES, "sft": run_sft, "vq": run_vq_stage}


def run_stage(cfg: StageConfig, run_root: Path) -> Path:
    """Run one stage unless it already finished; returns its folder."""
    runners = _stage_runners()
    if cfg.stage not in runners:
        raise ConfigError(f"stage: {cfg.stage!r} is not one of {sorted(runners)}")
    out_dir = run_root / cfg.out
    if (out_dir / DONE).is_file():
        log.info("%s: already done, skipping", cfg.out)
        return out_dir
    started = time.time()
    runners[cfg.stage](cfg, run_root)
    _write_json(out_dir / DONE, {"stage": cfg.stage, "seconds": round(time.time() - started, 1)})
    return out_dir


def load_recipe(folder: str | os.PathLike) -> tuple[RecipeConfig, Path]:
    folder = Path(folder)
    path = folder / "recipe.yaml"
    if not path.is_file():
        raise ConfigError(f"{folder}: not a recipe folder (no recipe.yaml)")
    recipe = load_config(RecipeConfig, path)
    for name in recipe.stages:
        if not (folder / name).is_file():
            raise ConfigError(f"{path}: stage file {name!r} not found in {folder}")
    return recipe, folder


def stage_configs(recipe: RecipeConfig, folder: Path, overrides: list[str], skip: list[str] = ()) -> list[StageConfig]:
    """The recipe's stages with ``init_from`` chained through the ones not skipped."""
    unknown = set(skip) - {Path(n).stem for n in recipe.stages}
    if unknown:
        raise ConfigError(f"--skip: no stage named {sorted(unknown)[0]!r} (stages: {[Path(n).stem for n in recipe.stages]})")
    configs, previous = [], None
    for name in recipe.stages:
        if Path(name).stem in skip:
            continue
        cfg = load_stage_config(folder / name, overrides)
        configs.append(dataclasses.replace(cfg, init_from=previous))
        previous = cfg.out
    return configs


def load_recipe_stage(path: str | os.PathLike, overrides: list[str] = ()) -> StageConfig:
    """One stage file, chained like ``run_recipe`` chains it: a stage of a recipe folder starts from the
    stage before it in ``recipe.yaml`` (its folder in the run root) unless ``init_from`` is overridden.
    A stage file outside a recipe, or the recipe's first stage, keeps its own ``init_from``."""
    path = Path(path)
    cfg = load_stage_config(path, list(overrides))
    if cfg.init_from or any(o.split("=", 1)[0].strip() == "init_from" for o in overrides):
        return cfg
    if not (path.parent / "recipe.yaml").is_file():
        return cfg
    recipe, folder = load_recipe(path.parent)
    files = [(folder / name).resolve() for name in recipe.stages]  # names may reach into other folders
    if path.resolve() not in files or files.index(path.resolve()) == 0:
        return cfg
    previous = load_stage_config(files[files.index(path.resolve()) - 1]).out  # its own name: out= renames this one
    log.info("%s: starts from %s, the stage before it in %s (override with init_from=...)", cfg.out, previous,
             folder / "recipe.yaml")
    return dataclasses.replace(cfg, init_from=previous)


def run_recipe(folder: str | os.PathLike, run_root: str | None = None, overrides: list[str] = (), skip: list[str] = ()) -> Path:
    """Generate the world (if the recipe has one), then run every stage not skipped. Returns the run folder."""
    recipe, folder = load_recipe(folder)
    root = Path(run_root or recipe.run_root)
    configs = stage_configs(recipe, folder, list(overrides), list(skip))  # a typo fails before any work
    if recipe.world is not None:
        from keye.data.world import WorldConfig, generate_world

        generate_world(root / "world", WorldConfig.from_dict(recipe.world), progress=True)
    for cfg in configs:
        run_stage(cfg, root)
    if recipe.eval and configs:
        evaluate_stage(configs[-1], root, recipe.eval)
    return root


def evaluate_stage(cfg: StageConfig, run_root: Path, specs: list[EvalSpec]) -> dict[str, Any]:
    """Held-out accuracy of a finished stage's model, seeing frames the way the stage trained on them.
    Results (resumable, per item) land in ``<stage>/eval/<split>-<mode>/``; a summary in ``eval.json``."""
    from keye.api import load
    from keye.eval.runner import evaluate_world
    from keye.train.runner import resolve_device

    # fp32 on the stage's device: greedy answers then match what the stage's own numbers were
    pipe = load(run_root / cfg.out / "model", device=resolve_device(cfg.run.device), dtype="float32",
                slow_fast=cfg.video.slow_fast)
    summary = {}
    for spec in specs:
        name = f"{Path(spec.split).stem}-{spec.mode}"
        results = evaluate_world(
            pipe, run_root / spec.split, out_dir=run_root / cfg.out / "eval" / name, mode=spec.mode,
            max_new_tokens=spec.max_new_tokens, video_options=cfg.video.part_defaults(),
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
    recipe, folder = load_recipe(folder)
    rows = []
    for cfg in stage_configs(recipe, folder, list(overrides)):
        rows.append(estimate_stage(cfg, recipe.gpus_per_node * recipe.nodes))
    _print_estimates(rows, recipe)
    return rows


def estimate_stage(cfg: StageConfig, gpus: int) -> dict[str, Any]:
    """Parameter counts and a per-GPU memory estimate (weights, grads, Adam states) for the stage's
    strategy. Mixed precision as DeepSpeed/FSDP run it: bf16 weights and grads (2 + 2 bytes), fp32
    master weights and two Adam moments (12 bytes) for the trainable ones; frozen weights 2 bytes.
    ZeRO-1 shards the 12, ZeRO-2 also the grads, ZeRO-3/FSDP2 everything. Activations are not included:
    they depend on sequence length and checkpointing, and are reported separately by a real run."""
    from keye.models import build_model
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
    weights = shard(2 * n_all, zero >= 3)
    grads = shard(2 * n_train, zero >= 2)
    states = shard(12 * n_train, zero >= 1)
    return {
        "stage": cfg.out, "model": cfg.model, "strategy": cfg.run.dist.strategy, "zero": zero,
        "params": n_all, "trainable": n_train, "by_group": {g: n for g, n in total.items() if n},
        "gib_per_gpu": (weights + grads + states) / 2**30, "gpus": gpus,
    }


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
    print(f"dry run: {recipe.nodes} node(s) x {recipe.gpus_per_node} GPU(s); weights+grads+optimizer states, no activations")
    print(f"{'stage':<20}{'model':<22}{'strategy':<12}{'params':>10}{'trainable':>11}{'GiB/GPU':>10}")
    for r in rows:
        strategy = f"{r['strategy']}" + (f"/z{r['zero']}" if r["strategy"] == "deepspeed" else "")
        print(f"{r['stage']:<20}{r['model']:<22}{strategy:<12}{r['params'] / 1e9:>9.3f}B{r['trainable'] / 1e9:>10.3f}B"
              f"{r['gib_per_gpu']:>10.1f}")


def _write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=1))
