"""State-dict adapter between our model and the published Keye-VL checkpoint layout.

Published layout (Keye-VL-1.5-8B; Keye-VL-2.0 for the MoE decoder): safetensors shards plus
``model.safetensors.index.json``; names ``visual.vision_model.*``, ``mlp_AR.*``, ``model.*``,
``lm_head.weight``. Our module tree already uses those names; the differences are

* MoE experts: published ``model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight`` per expert,
  ours transformers 5's fused ``mlp.experts.gate_up_proj`` (E, 2I, H) [gate rows then up rows] and
  ``mlp.experts.down_proj`` (E, H, I);
* the SigLIP attention-pooling head ``visual.vision_model.head.*`` that some releases carry and no
  Keye forward reads: kept aside on load and written back on save, so a round trip is lossless.

Torchtitan's ``StateDictAdapter`` is the model for this (``to_hf`` / ``from_hf``).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from keye.errors import ConfigError, KeyeInputError
from keye.models.configuration import KeyeConfig
from keye.models.weights import INDEX_NAME
# The published config.json is flat like Qwen2-VL's: decoder fields at the top level, a SigLIP
# `vision_config`, mRoPE sections and RoPE scaling under `rope_scaling`. An MoE decoder is recognised by
# `num_experts`. Fields outside these lists are kept verbatim (KeyeConfig.published_config).
_VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
                "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout")
_TOKEN_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
_TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
              "attention_bias", "tie_word_embeddings", "num_experts", "num_experts_per_tok",
              "moe_intermediate_size", "norm_topk_prob", "decoder_sparse_step", "mlp_only_layers",
              "router_aux_loss_coef")
_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")
_FUSED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(gate_up_proj|down_proj)$")
UNUSED_PREFIXES = ("visual.vision_model.head.",)


class KeyeStateDictAdapter:
    """Converts state dicts both ways; ``unused`` holds published tensors our model has no slot for."""

    def __init__(self, config: KeyeConfig):
        self.config = config
        self.unused: dict[str, torch.Tensor] = {}

    def from_published(self, published: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ours: dict[str, torch.Tensor] = {}
        experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
        for name, tensor in published.items():
            if name.startswith(UNUSED_PREFIXES):
                self.unused[name] = tensor
            elif m := _EXPERT.match(name):
                experts.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = tensor
            else:
                ours[name] = tensor
        n = getattr(self.config.text_config, "num_experts", 0)
        for prefix, by_expert in experts.items():
            if sorted(by_expert) != list(range(n)) or any(len(p) != 3 for p in by_expert.values()):
                raise KeyeInputError(f"{prefix}: expected gate/up/down weights for experts 0..{n - 1}")
            ours[f"{prefix}.gate_up_proj"] = torch.stack(
                [torch.cat([by_expert[e]["gate"], by_expert[e]["up"]], dim=0) for e in range(n)]
            )
            ours[f"{prefix}.down_proj"] = torch.stack([by_expert[e]["down"] for e in range(n)])
        return ours

    def to_published(self, ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        published: dict[str, torch.Tensor] = {}
        for name, tensor in ours.items():
            if m := _FUSED.match(name):
                prefix = m.group(1)
                for e, w in enumerate(tensor.unbind(0)):
                    if m.group(2) == "down_proj":
                        published[f"{prefix}.{e}.down_proj.weight"] = w.contiguous()
                    else:
                        gate, up = w.chunk(2, dim=0)
                        published[f"{prefix}.{e}.gate_proj.weight"] = gate.contiguous()
                        published[f"{prefix}.{e}.up_proj.weight"] = up.contiguous()
            else:
                published[name] = tensor
        published.update(self.unused)
        return published


def _rope_parameters(published: dict) -> tuple[dict, list | None, bool]:
    """The published ``rope_scaling`` (or ``rope_parameters``) -> transformers ``rope_parameters`` for the
    decoder, the mRoPE sections and whether they interleave (``mrope_interleaved``, vLLM's spelling).

    Every key but those two goes to transformers, which applies the type through its own
    ``ROPE_INIT_FUNCTIONS`` (linear, dynamic, yarn, longrope, llama3, ...). ``type: mrope`` is Qwen2-VL's
    name for mRoPE with unscaled frequencies, i.e. ``default``.
    """
    rope = dict(published.get("rope_scaling") or published.get("rope_parameters") or {})
    mrope_section = rope.pop("mrope_section", None)
    interleaved = bool(rope.pop("mrope_interleaved", False))
    kinds = {"default" if k == "mrope" else k for k in (rope.pop("type", None), rope.pop("rope_type", None)) if k}
    if len(kinds) > 1:
        raise ConfigError(f"config.json rope_scaling: 'type' and 'rope_type' disagree ({sorted(kinds)})")
    kind = kinds.pop() if kinds else "default"
    if kind != "default" and kind not in ROPE_INIT_FUNCTIONS:
        raise ConfigError(f"config.json rope_scaling: type {kind!r} is not a RoPE type transformers knows "
                          f"(default, {', '.join(ROPE_INIT_FUNCTIONS)})")
    if "rope_theta" in published:
        rope["rope_theta"] = published["rope_theta"]
    return {"rope_type": kind, **rope}, mrope_section, interleaved


def config_from_published(published: dict) -> KeyeConfig:
    """A published (flat) Keye-VL config.json dict -> KeyeConfig.

    Decoder fields become the transformers text config (``rope_scaling`` type and factor included),
    ``vision_config`` the ViT config; the whole dict is kept as ``published_config`` so that
    ``config_to_published`` writes back every field, the ones the toolkit does not read too.
    """
    vision = {k: v for k, v in published.get("vision_config", {}).items() if k in _VISION_KEYS}
    text = {k: published[k] for k in _TEXT_KEYS if k in published}
    text["rope_parameters"], mrope_section, interleaved = _rope_parameters(published)
    text["model_type"] = "qwen3_moe" if "num_experts" in text else "qwen3"
    merge = published.get("vision_config", {}).get("spatial_merge_size", 2)
    try:
        return KeyeConfig(
            vision_config=vision, projector_config={"merge_size": merge}, text_config=text,
            mrope_section=mrope_section, mrope_interleaved=interleaved, published_config=copy.deepcopy(published),
            **{k: published[k] for k in _TOKEN_KEYS if k in published},
        )
    except KeyeInputError:
        raise
    except (KeyError, ValueError, TypeError) as err:  # transformers' own checks, e.g. a RoPE type's missing keys
        raise ConfigError(f"config.json: {err}") from None


def _published_fields(config: KeyeConfig) -> dict:
    """The config.json fields the toolkit reads, from ``config``, in the published spelling."""
    text = config.text_config
    out = {k: getattr(text, k) for k in _TEXT_KEYS if hasattr(text, k)}
    rope = dict(text.rope_parameters)
    out["rope_theta"] = rope.pop("rope_theta")
    kind = rope.pop("rope_type", "default")
    out["rope_scaling"] = {"type": kind, "rope_type": kind, **rope, "mrope_section": list(config.mrope_section)}
    if config.mrope_interleaved:
        out["rope_scaling"]["mrope_interleaved"] = True
    vision = config.vision_config.to_dict()
    out["vision_config"] = {k: vision[k] for k in _VISION_KEYS} | {"spatial_merge_size": config.projector_config.merge_size}
    out.update({k: getattr(config, k) for k in _TOKEN_KEYS})
    return out


def _as_written(ours: dict, read: dict, source: dict) -> dict:
    """``ours`` laid over ``source``: a field whose value is still the one read from ``source`` (``read``)
    keeps the file's spelling (or stays out, if the file did not have it); a changed field is written as
    ``ours``; a field the toolkit does not read is written as ``source`` had it."""
    out = {}
    for key in dict.fromkeys([*source, *ours]):
        if key not in ours:
            out[key] = source[key]
        elif key in read and ours[key] == read[key]:
            if key in source:
                out[key] = source[key]
        elif isinstance(ours[key], dict) and isinstance(source.get(key), dict):
            out[key] = _as_written(ours[key], read.get(key) or {}, source[key])
        else:
            out[key] = ours[key]
    return out


def config_to_published(config: KeyeConfig) -> dict:
    """KeyeConfig -> the published flat config.json layout (inverse of ``config_from_published``).

    For a config read from a published file the result is that file, with the fields changed since
    written anew: unknown fields (``architectures``, ``torch_dtype``, a newer release's additions, ...)
    are kept, not dropped.
    """
    ours = _published_fields(config)
    source = config.published_config
    if not source:
        return ours
    return _as_written(ours, _published_fields(config_from_published(source)), source)


def read_published(ckpt_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a sharded (index + shards) or single-file safetensors checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    index = ckpt_dir / INDEX_NAME
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (ckpt_dir / "model.safetensors").exists():
        shards = ["model.safetensors"]
    else:
        raise KeyeInputError(f"{ckpt_dir}: no {INDEX_NAME} or model.safetensors")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(str(ckpt_dir / shard)))
    return state


def write_published(state: dict[str, torch.Tensor], out_dir: str | Path, max_shard_bytes: int = 5 * 2**30) -> None:
    """Shards named ``model-0000i-of-0000n.safetensors`` plus the index, in key order."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(state):
        nbytes = state[name].numel() * state[name].element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = state[name].contiguous()
        size += nbytes
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / fname), metadata={"format": "pt"})
        for name, t in shard.items():
            weight_map[name] = fname
            total += t.numel() * t.element_size()
    (out_dir / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def load_published_model(ckpt_dir: str | Path):
    """Build a model from a published checkpoint folder (its config.json) and load its weights."""
    from keye.models.modeling import KeyeForConditionalGeneration

    config_path = Path(ckpt_dir) / "config.json"
    if not config_path.exists():
        raise KeyeInputError(f"{ckpt_dir}: no config.json")
    config = config_from_published(json.loads(config_path.read_text()))
    config.vision_config.packing_position_embeddings = _packing_rows(ckpt_dir)
    model = KeyeForConditionalGeneration(config)
    return model, load_published(model, ckpt_dir)


def _packing_rows(ckpt_dir: str | Path) -> int:
    """Rows of the (unused) packing position table in the checkpoint, 0 when absent."""
    from safetensors import safe_open

    name = "visual.vision_model.embeddings.packing_position_embedding.weight"
    index = Path(ckpt_dir) / INDEX_NAME
    shard = json.loads(index.read_text())["weight_map"].get(name) if index.exists() else "model.safetensors"
    if shard is None:
        return 0
    with safe_open(str(Path(ckpt_dir) / shard), "pt") as f:
        return f.get_slice(name).get_shape()[0] if name in f.keys() else 0


def load_published(model, ckpt_dir: str | Path) -> KeyeStateDictAdapter:
    """Load a published-layout checkpoint into ``model`` (strict: every slot filled, nothing extra)."""
    adapter = KeyeStateDictAdapter(model.config)
    ours = adapter.from_published(read_published(ckpt_dir))
    missing, unexpected = model.load_state_dict(ours, strict=False)
    if missing or unexpected:
        raise KeyeInputError(f"{ckpt_dir}: missing weights {missing[:5]}..., unexpected {unexpected[:5]}...")
    return adapter


def save_published(model, out_dir: str | Path, adapter: KeyeStateDictAdapter | None = None, **kwargs) -> None:
    """Write ``model`` in the published layout (``adapter`` carries unused tensors from a load)."""
    adapter = adapter or KeyeStateDictAdapter(model.config)
    write_published(adapter.to_published(model.state_dict()), out_dir, **kwargs)
    (Path(out_dir) / "config.json").write_text(json.dumps(config_to_published(model.config), indent=2))
