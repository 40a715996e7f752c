"""Weights are read from safetensors only, and checked before a loader touches them.

A pickle (``pytorch_model.bin``, ``*.pt``) can run code when it is loaded, so a folder that holds only
pickled weights is refused with the one-time offline conversion to do on a trusted machine. A safetensors
file that is truncated or damaged is named with what is wrong, instead of surfacing as a raw error from
deep inside a library.
"""

from __future__ import annotations

import json
from pathlib import Path

from keye.errors import KeyeInputError

INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
CONVERT = ("convert them once, offline, on a machine you trust: for each file, "
           "safetensors.torch.save_file(torch.load(FILE, weights_only=True), FILE_WITHOUT_SUFFIX + '.safetensors'), "
           "or save_pretrained(..., safe_serialization=True) from the library that wrote them")


def weight_files(folder: str | Path) -> list[Path]:
    """The safetensors files of a model folder (the shards its index names, or ``model.safetensors``),
    each checked to be whole: its header parses and its data lies inside the file."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as err:
            raise KeyeInputError(f"{index}: damaged ({err})") from None
        files = [folder / name for name in names]
    elif (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    else:
        pickles = sorted(p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise KeyeInputError(f"{folder}: holds only pickled weights ({', '.join(pickles)}), which the toolkit never "
                                 f"loads (a pickle can run code); {CONVERT}")
        raise KeyeInputError(f"{folder}: no weights (model.safetensors or {INDEX_NAME})")
    for path in files:
        check_safetensors(path)
    return files


def check_safetensors(path: Path) -> None:
    """``path`` is a whole safetensors file, or a ``KeyeInputError`` naming it and what is wrong."""
    from safetensors import safe_open

    if not path.is_file():
        raise KeyeInputError(f"{path}: missing (the checkpoint's index names it)")
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise KeyeInputError(f"{path}: not a readable safetensors file, truncated or damaged ({err})") from None
