"""``keye.load``: whatever the source is, a ready ``KeyePipeline``.

Sources are recognised by registered loaders, tried in order: a registered variant name (random weights,
for tests and smoke runs), a toolkit checkpoint folder (``save_pretrained`` of model and processor), a
published-layout Keye-VL folder (through ``keye.models.adapter``). The model goes on the best device in
the best dtype it supports.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from keye.api.pipeline import KeyePipeline
from keye.errors import ConfigError, KeyeInputError

log = logging.getLogger("keye.api")


def best_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def best_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware has it (the published checkpoints are bf16), else fp16 on GPUs, fp32 on CPU."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


@dataclass(frozen=True)
class Loader:
    """Recognises one kind of source (``detect``) and builds (model, processor) from it (``load``)."""

    name: str
    detect: Callable[[str], bool]
    load: Callable[[str, torch.dtype], tuple[Any, Any]]


LOADERS: list[Loader] = []


def register_loader(name: str, detect: Callable[[str], bool]):
    def wrap(fn):
        LOADERS.append(Loader(name, detect, fn))
        return fn

    return wrap


def _read_config(source: str) -> dict | None:
    path = Path(source) / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise KeyeInputError(f"{path}: not valid JSON ({err})") from None


def _is_variant(source: str) -> bool:
    from keye.models import VARIANTS

    return source in VARIANTS and not Path(source).exists()


def _is_toolkit_checkpoint(source: str) -> bool:
    config = _read_config(source)
    return config is not None and config.get("model_type") == "keye"


def _is_published(source: str) -> bool:
    """A Keye-VL release folder: its config names a Keye architecture (the releases ship their own
    remote code, which we never run), or is the flat layout ``save_published`` writes."""
    config = _read_config(source)
    if config is None or config.get("model_type") == "keye":
        return False
    names = [config.get("model_type") or "", *(config.get("architectures") or [])]
    return any("keye" in str(n).lower() for n in names) or ("vision_config" in config and "model_type" not in config)


# Only keye-nano ships a tokenizer in the package; the large variants' tokenizers come with their weights.
_VARIANT_PROCESSORS = {"keye-nano": "load_nano_processor"}


@register_loader("variant", _is_variant)
def _load_variant(source: str, dtype: torch.dtype):
    import keye.processing
    from keye.models import build_model

    if source not in _VARIANT_PROCESSORS:
        raise KeyeInputError(f"variant {source!r} has no bundled tokenizer; pass a checkpoint folder instead "
                             f"(variants with one: {', '.join(_VARIANT_PROCESSORS)})")
    log.warning("keye.load(%r): a registered variant with RANDOM weights (untrained); its answers are noise", source)
    processor = getattr(keye.processing, _VARIANT_PROCESSORS[source])()
    return build_model(source).to(dtype), processor


@register_loader("toolkit checkpoint", _is_toolkit_checkpoint)
def _load_toolkit(source: str, dtype: torch.dtype):
    import keye.models  # noqa: F401 - registers the Auto classes
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype)
    return model, AutoProcessor.from_pretrained(source)


@register_loader("published Keye-VL checkpoint", _is_published)
def _load_published(source: str, dtype: torch.dtype):
    from transformers import AutoTokenizer

    from keye.models.adapter import load_published_model
    from keye.processing import SPECIAL_TOKENS, KeyeProcessor

    if not any((Path(source) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise KeyeInputError(f"{source}: a published checkpoint needs its tokenizer files beside the weights")
    tokenizer = AutoTokenizer.from_pretrained(source)
    missing = [t for t in SPECIAL_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        raise KeyeInputError(f"{source}: the tokenizer lacks Keye's special tokens {missing}")
    model, _ = load_published_model(source)
    return model.to(dtype), KeyeProcessor(tokenizer)


def load(name_or_path: str | os.PathLike, *, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, **pipeline_kwargs) -> KeyePipeline:
    """A ready ``KeyePipeline`` from a toolkit checkpoint folder (``save_pretrained`` of model and
    processor), a published-layout Keye-VL folder (via ``keye.models.adapter``), or a registered
    variant name (random weights: for tests and smoke runs).

    device: default the best available (cuda, mps, cpu); dtype: default bf16 / fp16 / fp32 by device
    ("bfloat16"-style strings are accepted).
    """
    source = os.fspath(name_or_path)
    device = torch.device(device) if device is not None else best_device()
    if isinstance(dtype, str):
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ConfigError(f"dtype {dtype!r} is not a torch dtype (e.g. bfloat16, float16, float32)")
        dtype = getattr(torch, dtype)
    dtype = dtype or best_dtype(device)
    for loader in LOADERS:
        if loader.detect(source):
            log.info("keye.load: %s as a %s on %s in %s", source, loader.name, device, dtype)
            model, processor = loader.load(source, dtype)
            return KeyePipeline(model.to(device), processor, **pipeline_kwargs)
    if not Path(source).exists():
        from keye.models import VARIANTS

        raise KeyeInputError(f"{source}: no such checkpoint folder or variant (variants: {', '.join(sorted(VARIANTS))})")
    raise KeyeInputError(f"{source}: not a Keye checkpoint (expected config.json with model_type 'keye' or a "
                         "published Keye-VL config)")
