"""Pretrained starts that ship inside the package, as Keye-VL's Qwen3 and SigLIP are its recipe's starts.

Each is a saved model folder (``save_pretrained`` of model and processor, safetensors) under
``keye/models/assets/``, with ``provenance.json``: the recipe and command that reproduce it, its seed, the
world version, the SHA-256 of its weights and its held-out figures. A stage names one in ``init_from``
(``init_from: keye-nano-base``) when the run folder holds no stage of that name.
"""

from __future__ import annotations

import json
from pathlib import Path

from keye.errors import KeyeInputError
from keye.fileio import sha256_file

ASSETS = Path(__file__).parent / "assets"
PRETRAINED = {"keye-nano-base": ASSETS / "keye-nano-base"}  # reproduced by pipelines/nano-base
PROVENANCE = "provenance.json"


def pretrained_folder(name: str) -> Path | None:
    """The shipped folder of pretrained start ``name``, or None when no such start ships."""
    folder = PRETRAINED.get(name)
    return folder if folder is not None and (folder / "config.json").is_file() else None


def verify_pretrained(name: str) -> dict:
    """The start's provenance, after checking its weights against the SHA-256 recorded there (a changed
    or damaged shipped file is a ``KeyeInputError`` naming it)."""
    folder = pretrained_folder(name)
    if folder is None:
        raise KeyeInputError(f"pretrained start {name!r}: not shipped (known: {', '.join(PRETRAINED)})")
    provenance = json.loads((folder / PROVENANCE).read_text())
    for file, digest in provenance["sha256"].items():
        actual = sha256_file(folder / file)
        if actual != digest:
            raise KeyeInputError(f"{folder / file}: SHA-256 {actual[:12]}... differs from its provenance's "
                                 f"{digest[:12]}...")
    return provenance
