"""Resumable training checkpoints, safetensors only, written atomically.

A checkpoint is a folder ``run_dir/checkpoints/step_{N:08d}/`` holding
  model.safetensors      the trainable model's state dict
  optimizer.safetensors  every tensor of the optimizer state (``state.{i}.{name}``: the i-th parameter's)
  rng.safetensors        torch CPU (and CUDA) generator states
  state.json             step, param groups, the optimizer state's keys (parameter ids, or parameter names
                         when FSDP2 gathered it), scheduler, python/numpy RNG, data position, anything else
  manifest.json          every other file's size and SHA-256, written last
It is written into ``step_N.tmp/`` and renamed into place, then ``latest`` is replaced atomically, so a run
killed mid-write leaves the previous checkpoint intact and never a half-written one under a real name.
A checkpoint damaged later (a truncated copy, a full disk, bit rot) fails its manifest: ``latest_checkpoint``
reports it by path and falls back to the newest intact one.
No pickle anywhere: a checkpoint from an untrusted source cannot execute code on load.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from keye.errors import KeyeInputError
from keye.fileio import atomic_folder, atomic_write_text, sha256_file
from keye.models.weights import check_safetensors

log = logging.getLogger(__name__)
_LATEST = "latest"
MANIFEST = "manifest.json"


@dataclass
class TrainState:
    """What a loop needs besides module/optimizer tensors to continue exactly where it stopped."""

    step: int = 0
    data_position: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def save_checkpoint(
    run_dir: str | os.PathLike,
    model_state: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any] | None,
    scheduler_state: dict[str, Any] | None,
    state: TrainState,
    keep: int = 2,
) -> Path:
    """Write a checkpoint for ``state.step`` from state dicts (as ``module.state_dict()`` /
    ``optimizer.state_dict()`` return them, or as a strategy gathered them) and prune all but the newest
    ``keep``. The RNG states are the calling process's. Returns the checkpoint's folder."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step_{state.step:08d}"
    with atomic_folder(final) as tmp:
        _write_checkpoint(tmp, model_state, optimizer_state, scheduler_state, state)
    atomic_write_text(root / _LATEST, final.name)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_checkpoint(tmp: Path, model_state, optimizer_state, scheduler_state, state: TrainState) -> None:
    save_file(_contiguous(model_state), tmp / "model.safetensors")
    meta: dict[str, Any] = {
        "step": state.step,
        "data_position": state.data_position,
        "extra": state.extra,
        "python_rng": _jsonable_python_rng(random.getstate()),
        "numpy_rng": _jsonable_numpy_rng(np.random.get_state()),
    }
    if optimizer_state is not None:
        tensors, meta["optimizer"] = _flatten_optimizer(optimizer_state)
        save_file(tensors, tmp / "optimizer.safetensors")
    if scheduler_state is not None:
        meta["scheduler"] = scheduler_state
    rng = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng |= {f"torch_cuda_{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())}
    save_file(rng, tmp / "rng.safetensors")
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in sorted(tmp.iterdir())}
    (tmp / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def latest_checkpoint(run_dir: str | os.PathLike) -> Checkpoint | None:
    """The newest intact checkpoint of a run, or None. A damaged one (see ``Checkpoint.verify``) is
    reported with its path and what is wrong, and the next older one is tried."""
    root = Path(run_dir) / "checkpoints"
    candidates = sorted((p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp")), reverse=True)
    for path in candidates:
        try:
            checkpoint = Checkpoint(path)
            checkpoint.verify()
        except KeyeInputError as err:
            log.warning("%s; skipping it", err)
            continue
        return checkpoint
    if candidates:
        log.warning("%s: no intact checkpoint left (%d damaged); starting from step 0", root, len(candidates))
    return None


class Checkpoint:
    """One checkpoint folder, read part by part: a loop restores the model's weights before a strategy
    wraps or shards it, and the optimizer's state only once the strategy has built the optimizer."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / "state.json").is_file():
            raise KeyeInputError(f"checkpoint {self.path}: no state.json (not a checkpoint folder, or an interrupted write)")
        try:
            self.meta: dict[str, Any] = json.loads((self.path / "state.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise KeyeInputError(f"checkpoint {self.path / 'state.json'}: damaged, not valid JSON ({err})") from None

    def verify(self) -> None:
        """Every file as the manifest lists it (size, then SHA-256), or a ``KeyeInputError`` naming the file
        and what differs. Checkpoints written before manifests get their safetensors headers checked."""
        manifest = self.path / MANIFEST
        if not manifest.is_file():
            for name in ("model.safetensors", "rng.safetensors", "optimizer.safetensors"):
                if name == "model.safetensors" or (self.path / name).exists():
                    check_safetensors(self.path / name)
            return
        try:
            files = json.loads(manifest.read_text())["files"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as err:
            raise KeyeInputError(f"checkpoint {manifest}: damaged ({err})") from None
        for name, want in files.items():
            path = self.path / name
            if not path.is_file():
                raise KeyeInputError(f"checkpoint {path}: missing (the manifest lists it)")
            size = path.stat().st_size
            if size != want["bytes"]:
                raise KeyeInputError(f"checkpoint {path}: {size} bytes where {want['bytes']} were written (truncated?)")
            if sha256_file(path) != want["sha256"]:
                raise KeyeInputError(f"checkpoint {path}: its SHA-256 differs from the one written (corrupted)")

    @property
    def train_state(self) -> TrainState:
        return TrainState(step=self.meta["step"], data_position=self.meta["data_position"], extra=self.meta["extra"])

    def model_state(self) -> dict[str, torch.Tensor]:
        return load_file(self.path / "model.safetensors")

    def optimizer_state(self) -> dict[str, Any] | None:
        """The optimizer's state dict as saved, or None when the checkpoint holds none."""
        if "optimizer" not in self.meta:
            return None
        return _unflatten_optimizer(load_file(self.path / "optimizer.safetensors"), self.meta["optimizer"])

    @property
    def scheduler_state(self) -> dict[str, Any] | None:
        return self.meta.get("scheduler")

    def restore_rng(self) -> None:
        """Python, numpy and torch (CPU, and CUDA where there is one) generators as they were at saving."""
        random.setstate(_python_rng_from_json(self.meta["python_rng"]))
        np.random.set_state(_numpy_rng_from_json(self.meta["numpy_rng"]))
        rng = load_file(self.path / "rng.safetensors")
        torch.set_rng_state(rng["torch_cpu"])
        if torch.cuda.is_available():
            cuda = [rng[k] for k in sorted(rng) if k.startswith("torch_cuda_")]
            if cuda:
                torch.cuda.set_rng_state_all(cuda)


def load_model_state(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str | os.PathLike) -> None:
    """``module.load_state_dict(state)``, with a mismatch reported as a ``KeyeInputError`` naming ``source``."""
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise KeyeInputError(f"checkpoint {source}: does not match the model (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")


def _contiguous(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared storage (tied embeddings) and non-contiguous views; clone those.
    seen: set[int] = set()
    out = {}
    for key, tensor in state.items():
        tensor = tensor.detach()
        ptr = tensor.data_ptr() if tensor.numel() else -1
        if ptr in seen or not tensor.is_contiguous():
            tensor = tensor.clone().contiguous()
        seen.add(ptr)
        out[key] = tensor.cpu()
    return out


def _flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors as ``state.<i>.<name>`` for the i-th entry of ``state``; its keys (parameter ids, or names
    for a sharded strategy's gathered state) and everything else go into JSON."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    keys = list(state_dict["state"])
    for i, param_state in enumerate(state_dict["state"].values()):
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{i}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(i), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "keys": keys, "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    # checkpoints from before "keys" numbered the entries by parameter id
    keys = meta.get("keys")
    key_of = (lambda i: keys[i]) if keys is not None else (lambda i: i)
    state: dict[Any, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, i, field = name.split(".", 2)
        state.setdefault(key_of(int(i)), {})[field] = value
    for i, values in meta["scalars"].items():
        state.setdefault(key_of(int(i)), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def _jsonable_python_rng(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _python_rng_from_json(state: list) -> tuple:
    version, internal, gauss = state
    return version, tuple(internal), gauss


def _jsonable_numpy_rng(state: tuple) -> list:
    name, keys, pos, has_gauss, cached = state
    return [name, keys.tolist(), int(pos), int(has_gauss), float(cached)]


def _numpy_rng_from_json(state: list) -> tuple:
    name, keys, pos, has_gauss, cached = state
    return name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached
