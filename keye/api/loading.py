"""``keye.load``: whatever the source is, a ready ``KeyePipeline``.

Sources are recognised by registered loaders, tried in order: a registered variant name (random weights,
for tests and smoke runs), a toolkit checkpoint folder (``save_pretrained`` of model and processor), a
published-layout Keye-VL folder (weights and config.json through ``keye.models.adapter``, the processor
from the folder's own tokenizer.json, preprocessor_config.json and chat template). The model goes on the
best device in the best dtype it supports.
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


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise KeyeInputError(f"{path}: not valid JSON ({err})") from None


def _read_config(source: str) -> dict | None:
    path = Path(source) / "config.json"
    return _read_json(path) if path.is_file() else None


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

    from keye.models.weights import weight_files

    weight_files(source)  # safetensors only, whole: a pickle-only or damaged folder is named before loading
    model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype, use_safetensors=True)
    return model, AutoProcessor.from_pretrained(source)


# The files of a published folder that the processor is built from, and what each holds. A release's
# chat template may come as chat_template.json (the Keye-VL releases) or chat_template.jinja (newer
# transformers); tokenizer_config.json's own template is the text-only one and is not used.
PUBLISHED_PROCESSOR_FILES = {
    "tokenizer.json": "the tokenizer",
    "preprocessor_config.json": "the image mean / std and pixel bounds",
    "chat_template.json": "the chat template (chat_template.jinja also serves)",
}


def published_processor(source: str | os.PathLike):
    """The processor of a published-layout folder, built from its own files: ``tokenizer.json`` (the
    ids of Keye's special tokens are read from it, each checked to be one token), ``preprocessor_config.json``
    (``keye.processing.ImageConfig``) and ``chat_template.json`` / ``chat_template.jinja``.

    A missing file is an error naming it (all missing ones at once), before any weight is read.
    """
    from transformers import AutoTokenizer, PreTrainedConfig

    from keye.processing import ImageConfig, KeyeProcessor, layout_token_ids

    folder = Path(source)
    have = {name: (folder / name).is_file() for name in PUBLISHED_PROCESSOR_FILES}
    have["chat_template.json"] |= (folder / "chat_template.jinja").is_file()
    missing = [f"{name} ({PUBLISHED_PROCESSOR_FILES[name]})" for name, ok in have.items() if not ok]
    if missing:
        raise KeyeInputError(f"{folder}: a published checkpoint needs its processor files beside the weights; "
                             f"missing: {'; '.join(missing)}")
    if (folder / "chat_template.json").is_file():
        template = _read_json(folder / "chat_template.json").get("chat_template")
        if not isinstance(template, str) or not template:
            raise KeyeInputError(f"{folder / 'chat_template.json'}: no 'chat_template' string in it")
    else:
        template = (folder / "chat_template.jinja").read_text()
    image_config = ImageConfig.from_preprocessor_config(
        _read_json(folder / "preprocessor_config.json"), str(folder / "preprocessor_config.json"))
    # config given: AutoTokenizer would otherwise parse the release's config.json as a generic config (noisy
    # RoPE warnings); the tokenizer files say which class to build
    tokenizer = AutoTokenizer.from_pretrained(str(folder), config=PreTrainedConfig(), local_files_only=True)
    layout_token_ids(tokenizer, str(folder / "tokenizer.json"))
    return KeyeProcessor(tokenizer, chat_template=template, image_config=image_config.to_dict())


@register_loader("published Keye-VL checkpoint", _is_published)
def _load_published(source: str, dtype: torch.dtype):
    from keye.models.adapter import load_published_model
    from keye.models.weights import weight_files

    processor = published_processor(source)
    weight_files(source)
    model, _ = load_published_model(source)
    return model.to(dtype), processor


def load(name_or_path: str | os.PathLike, *, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, **pipeline_kwargs) -> KeyePipeline:
    """A ready ``KeyePipeline`` from a toolkit checkpoint folder (``save_pretrained`` of model and
    processor), a published-layout Keye-VL folder (via ``keye.models.adapter`` and ``published_processor``:
    a missing processor file is an error naming it), a pretrained start shipped with the package
    (``keye-nano-base``, its files checked against their provenance), or a registered variant name (random
    weights: for tests and smoke runs).

    device: default the best available (cuda, mps, cpu); dtype: default bf16 / fp16 / fp32 by device
    ("bfloat16"-style strings are accepted).
    """
    from keye.models.pretrained import PRETRAINED, pretrained_folder, verify_pretrained

    source = os.fspath(name_or_path)
    if not Path(source).exists() and pretrained_folder(source) is not None:  # a start shipped with the package
        verify_pretrained(source)
        source = os.fspath(pretrained_folder(source))
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

        raise KeyeInputError(f"{source}: no such checkpoint folder, shipped start or variant (shipped: "
                             f"{', '.join(PRETRAINED)}; variants: {', '.join(sorted(VARIANTS))})")
    raise KeyeInputError(f"{source}: not a Keye checkpoint (expected config.json with model_type 'keye' or a "
                         "published Keye-VL config)")
