"""Keye vision-language model: ViT -> ``mlp_AR`` -> Qwen3 / Qwen3-MoE decoder (transformers' own).

Weight names are the published Keye-VL-1.5 ones: ``visual.vision_model.*``, ``mlp_AR.*``,
``model.*`` (the transformers decoder, used as a component) and an untied ``lm_head``. For an MoE
decoder the experts stay in transformers' fused layout; ``keye.models.adapter`` converts to and from
the per-expert layout of published checkpoints.

Text positions use 3D mRoPE as the published 1.5 model does (public ``KeyeVL1_5ForConditionalGeneration``
in vLLM implements ``SupportsMRoPE``; sections [16, 24, 24] for the 8B): text tokens advance
(t, h, w) together; every image or video frame is its own t=1 grid whose merged tokens get
(t0, t0 + row, t0 + col). Timestamps reach the model only as text (``<|frame|>12.5``). On text-only
input all three axes are equal and the rotation is exactly Qwen3's 1D RoPE.

``video_grid_thw`` may come one row per frame (this toolkit's processor) or with adjacent same-size
frames of a video merged into one t > 1 row plus ``num_frames`` (the official processor); the model
splits merged rows back per frame (``frame_grids``), so both layouts give the same outputs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.loss.loss_utils import ForCausalLMLoss
from transformers.modeling_outputs import ModelOutput
from transformers.models.qwen3.modeling_qwen3 import Qwen3Model
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts, Qwen3MoeModel, Qwen3MoeTopKRouter
from vector_quantize_pytorch import SimVQ

from keye.errors import ConfigError, KeyeInputError
from keye.models.attention import VARLEN_SDPA, Runs, decoder_attention
from keye.models.configuration import VISION_MODES, KeyeConfig
from keye.models.losses import ROUTER_LOSSES, head_cross_entropy
from keye.models.projector import KeyeProjector
from keye.models.vision import (FrameDifferenceEmbedding, KeyeVisionModel, VisionRotaryEmbedding2D, frame_grids, grid_list,
                               previous_frame_pixels)
from keye.models.visual_tokenizer import KeyeVisualTokenizer, code_ids, load_visual_tokenizer, merged_vit_features

TEXT_MODELS = {"qwen3": Qwen3Model, "qwen3_moe": Qwen3MoeModel}


# ----------------------------------------------------------------------------- text positions


class KeyeMRotaryEmbedding(nn.Module):
    """Multimodal RoPE around the decoder's own rotary module.

    The wrapped module computes cos/sin for each axis (t, h, w); each rotary pair then takes its angle from
    one axis. Contiguous (Qwen2-VL's ``apply_multimodal_rotary_pos_emb``, Keye-VL-1.5): section ``i`` of the
    half-dim takes axis ``i``, so w gets the lowest frequencies. Interleaved (Qwen3-VL): pair ``j`` takes h
    when ``j % 3 == 1`` and ``j < 3 * sections[1]``, w when ``j % 3 == 2`` and ``j < 3 * sections[2]``, else
    t, so every axis gets fast and slow frequencies. Text tokens have equal t, h and w, so the layout only
    changes how visual tokens rotate. Done once here so transformers' unchanged attention layers apply it;
    the wrapped module applies the text config's ``rope_parameters`` (linear, dynamic, yarn, ...).
    """

    def __init__(self, rotary: nn.Module, mrope_section: list[int], interleaved: bool = False):
        super().__init__()
        self.rotary = rotary
        self.mrope_section = list(mrope_section)
        self.set_layout(interleaved)

    def set_layout(self, interleaved: bool) -> None:
        """Choose the contiguous or the interleaved layout (class docstring)."""
        section = self.mrope_section
        self.interleaved = interleaved
        # the axis of each rotary pair; a list, not a buffer: models are built on the meta device
        if interleaved:
            axis_H = [j % 3 if j % 3 and j < 3 * section[j % 3] else 0 for j in range(sum(section))]
        else:
            axis_H = [axis for axis, size in enumerate(section) for _ in range(size)]
        self.axis_D = axis_H + axis_H  # rotate-half layout
        self._axis_index: torch.Tensor | None = None  # axis_D on the device of the last forward

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids: (3, B, L) or (B, L) -> cos, sin of shape (B, L, head_dim)."""
        if position_ids.ndim == 2:
            return self.rotary(x, position_ids)
        # one call for the three axes: dynamic and longrope types pick their frequencies from the largest
        # position over all of them, as Qwen2-VL-style mRoPE does; per-axis calls could disagree
        cos_3BLD, sin_3BLD = self.rotary(x, position_ids)
        if self._axis_index is None or self._axis_index.device != cos_3BLD.device:  # one copy, not one a forward
            self._axis_index = torch.tensor(self.axis_D, device=cos_3BLD.device)
        pick_1BLD = self._axis_index.expand(1, *cos_3BLD.shape[1:])
        return cos_3BLD.gather(0, pick_1BLD)[0], sin_3BLD.gather(0, pick_1BLD)[0]


def mrope_positions(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config: KeyeConfig,
    image_grid_thw: torch.Tensor | None = None,
    video_grid_thw: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """3D positions for a prompt.

    input_ids, attention_mask: (B, L). Grids are consumed in order of appearance, batch-major, images
    and frames independently (the processor's order); a row covering t > 1 frames counts as t rows,
    since every frame is its own block of pads between ``<|frame|>`` texts. ``segment_ids`` (B, L), for packed rows
    (``keye.data.packing``): positions restart at 0 where the segment changes, so each packed sample
    gets exactly the positions it gets alone. Returns positions (3, B, L) and per-sample ``deltas``
    (B, 1) = max position + 1 - real length, used to continue positions while decoding (meaningless
    for a packed row, which is never decoded from).
    """
    merge = config.projector_config.merge_size
    grids = {
        config.image_token_id: grid_list(frame_grids(image_grid_thw)) if image_grid_thw is not None else [],
        config.video_token_id: grid_list(frame_grids(video_grid_thw)) if video_grid_thw is not None else [],
    }
    cursor = {config.image_token_id: 0, config.video_token_id: 0}
    B, L = input_ids.shape
    positions = torch.zeros(3, B, L, dtype=torch.long, device=input_ids.device)
    deltas = torch.zeros(B, 1, dtype=torch.long, device=input_ids.device)
    for b in range(B):
        keep = attention_mask[b].bool()
        ids = input_ids[b][keep].tolist()
        segs = segment_ids[b][keep].tolist() if segment_ids is not None else [0] * len(ids)
        pos_3T = torch.zeros(3, len(ids), dtype=torch.long)
        i, nxt = 0, 0
        while i < len(ids):
            tok = ids[i]
            if i and segs[i] != segs[i - 1]:
                nxt = 0
            if tok not in grids:  # a run of text tokens of one sample: consecutive positions, one write
                j = i + 1
                while j < len(ids) and ids[j] not in grids and segs[j] == segs[j - 1]:
                    j += 1
                pos_3T[:, i:j] = torch.arange(nxt, nxt + j - i)
                i, nxt = j, nxt + j - i
                continue
            if cursor[tok] >= len(grids[tok]):
                raise KeyeInputError(f"sample {b}: more vision pad runs than grids in grid_thw for token id {tok}")
            t, h, w = grids[tok][cursor[tok]]
            cursor[tok] += 1
            gh, gw = h // merge, w // merge
            n = t * gh * gw
            if ids[i : i + n] != [tok] * n or len(set(segs[i : i + n])) != 1:
                raise KeyeInputError(
                    f"sample {b}: a vision block at token {i} needs {n} consecutive pad tokens of one packed "
                    f"sample for grid {(t, h, w)}"
                )
            tt, hh, ww = torch.meshgrid(torch.arange(t), torch.arange(gh), torch.arange(gw), indexing="ij")
            pos_3T[:, i : i + n] = torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]) + nxt
            nxt = int(pos_3T[:, i : i + n].max()) + 1
            i += n
        positions[:, b, keep] = pos_3T.to(positions.device)
        deltas[b] = nxt - len(ids)
    for tok, used in cursor.items():
        if used != len(grids[tok]):
            raise KeyeInputError(f"grid_thw has {len(grids[tok])} grids for token id {tok}, the prompt uses {used}")
    return positions, deltas


# ----------------------------------------------------------------------------- vision paths


def continuous_features(model: "KeyeForConditionalGeneration", pixel_values, grid_thw,
                        previous_pixels=None) -> torch.Tensor:
    """Keye-VL: ViT -> ``mlp_AR`` (2x2 merge, MLP) -> one LM-space vector per merged token."""
    previous = previous_pixels.to(model.dtype) if previous_pixels is not None else None
    return model.mlp_AR(model.visual(pixel_values.to(model.dtype), grid_thw, previous), grid_thw)


def discrete_features(model: "KeyeForConditionalGeneration", pixel_values, grid_thw,
                      previous_pixels=None) -> torch.Tensor:
    """Kelix: ViT -> visual tokenizer -> N code ids per merged token -> sum of their LM embeddings.

    The codes are discrete, so nothing upstream of the embedding table gets a gradient here: the
    tokenizer is trained on its own (the ``vq`` stage, ``keye.train.stages.vq``) and the LM learns the code embeddings.
    """
    return model.embed_code_ids(model.visual_code_ids(pixel_values, grid_thw, previous_pixels))


def frames_per_video(input_ids_BL: torch.Tensor, config, frame_tokens: list[int]) -> list[int]:
    """The frames of each video in the prompt, in order: each vision block's video pads (``<|vision_start|>``
    to its end) split into frames of ``frame_tokens`` pads each (the per-frame grid rows, in order)."""
    ids_T = input_ids_BL.flatten()
    block_T = (ids_T == config.vision_start_token_id).cumsum(0)
    pads_V = torch.unique_consecutive(block_T[ids_T == config.video_token_id], return_counts=True)[1].tolist()
    counts, k = [], 0
    for pads in pads_V:
        start = k
        while pads > 0 and k < len(frame_tokens):
            pads, k = pads - frame_tokens[k], k + 1
        if pads != 0:
            raise KeyeInputError(f"a video block's pads do not split into whole frames of video_grid_thw "
                                 f"(frames of {frame_tokens} pads)")
        counts.append(k - start)
    return counts


VISION_PATHS = {"continuous": continuous_features, "discrete": discrete_features}
assert set(VISION_PATHS) == set(VISION_MODES)


# ----------------------------------------------------------------------------- model


@dataclass
class KeyeCausalLMOutput(ModelOutput):
    """loss = lm_loss + aux_coef * aux_loss + z_coef * z_loss (router terms only for an MoE decoder)."""

    loss: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    aux_loss: torch.FloatTensor | None = None
    z_loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    router_logits: tuple[torch.FloatTensor, ...] | None = None


class KeyePreTrainedModel(PreTrainedModel):
    config_class = KeyeConfig
    config: KeyeConfig
    base_model_prefix = "keye"
    supports_gradient_checkpointing = True
    _no_split_modules = ["VisionEncoderLayer", "Qwen3DecoderLayer", "Qwen3MoeDecoderLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True

    def get_correct_attn_implementation(self, requested_attention: str | None, is_init_check: bool = False) -> str:
        # sdpa (also transformers' default) resolves to varlen_sdpa: the same kernel for every ordinary call, and
        # per-sample SDPA instead of a dense (B, 1, L, L) mask for packed rows and padded training batches
        if requested_attention in (None, "sdpa"):
            requested_attention = VARLEN_SDPA
        return super().get_correct_attn_implementation(requested_attention, is_init_check)

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        std = self.config.text_config.initializer_range
        if isinstance(module, Qwen3MoeExperts):
            init.normal_(module.gate_up_proj, mean=0.0, std=std)
            init.normal_(module.down_proj, mean=0.0, std=std)
        elif isinstance(module, Qwen3MoeTopKRouter):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, VisionRotaryEmbedding2D):
            # non-persistent buffer: rebuilt here because from_pretrained materialises modules from meta
            dim = module.inv_freq.shape[0] * 2
            theta = self.config.vision_config.rope_theta
            init.copy_(module.inv_freq, 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)))
        elif isinstance(module, FrameDifferenceEmbedding):
            init.zeros_(module.weight)
        elif isinstance(module, SimVQ):
            # SimVQ map starts as the identity so the implicit codebook is the (k-means) frozen table
            init.copy_(module.code_transform.weight, torch.eye(module.code_transform.weight.shape[0]))


class KeyeForConditionalGeneration(KeyePreTrainedModel, GenerationMixin):
    """Keye-VL: answers questions about images and videos, trains with assistant-only loss.

    Visual inputs are packed patches, Qwen2-VL style: ``pixel_values`` (sum t*h*w, 3*14*14) with
    ``image_grid_thw`` (N_img, 3), and ``pixel_values_videos`` with ``video_grid_thw``: one row per
    frame (t=1), or the official processor's rows that merge adjacent same-size frames of a video
    (t > 1) with ``num_frames`` (V,) frames per video. Keye-1.5 encodes frames separately, so both
    layouts give the same outputs. Each frame fills exactly h*w/4 ``<|image_pad|>`` /
    ``<|video_pad|>`` positions; any other count is an error.

    ``config.vision_mode == "discrete"`` swaps ``mlp_AR`` for a Kelix-style ``visual_tokenizer``: each
    pad position then receives the sum of the embeddings of its N code ids, which live in a reserved
    block after the text vocabulary (``code_ids``) with their own table ``model.visual_embed_tokens``
    (it takes mlp_AR's place, so it trains with the ``projector`` group; the tokenizer is the ``vq`` group). Prompts,
    positions, generate and the embedding API are the same in both modes. The ``lm_head`` predicts
    text only: understanding never emits visual codes, so the block is input-only (generating images
    would add output rows for it).
    """

    _tied_weights_keys = {}

    def __init__(self, config: KeyeConfig):
        super().__init__(config)
        text = config.text_config
        if config.vision_mode not in VISION_PATHS:
            raise ConfigError(f"vision_mode must be one of {list(VISION_PATHS)}, got {config.vision_mode!r}")
        self.visual = KeyeVisionModel(config.vision_config)
        self.model = TEXT_MODELS[text.model_type](text)
        # only the active path is built (no mlp_AR in discrete mode). Discrete codes pass no gradient, so a
        # discrete stage trains the code embeddings (projector group) and the LM; the tokenizer trains apart
        # (the vq stage, in a recipe or alone).
        if config.vision_mode == "continuous":
            self.mlp_AR = KeyeProjector(config.projector_config, config.vision_config.hidden_size, text.hidden_size)
        else:
            vq = config.visual_tokenizer_config
            merged = config.vision_config.hidden_size * config.projector_config.merge_size**2
            self.visual_tokenizer = KeyeVisualTokenizer(vq, merged)
            self.model.visual_embed_tokens = nn.Embedding(vq.num_codes, text.hidden_size)
        self.model.rotary_emb = KeyeMRotaryEmbedding(self.model.rotary_emb, config.mrope_section,
                                                     config.mrope_interleaved)
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.rope_deltas: torch.Tensor | None = None  # set on prefill, read while decoding (Qwen2-VL does the same)
        self.post_init()
        if self.model.config._attn_implementation == "sdpa":  # the decoder resolved it alone (see above)
            self.model.config._attn_implementation = VARLEN_SDPA

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    # ------------------------------------------------------------------ vision

    def visual_features(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor,
                        previous_pixels: torch.Tensor | None = None) -> torch.Tensor:
        """Packed patches (sum t*h*w, 3*p*p) -> LM-space tokens (sum t*h*w / 4, hidden); ``previous_pixels``,
        the same patches one frame earlier, for a tower with ``frame_difference``."""
        return VISION_PATHS[self.config.vision_mode](self, pixel_values, grid_thw, previous_pixels)

    @torch.no_grad()
    def visual_code_ids(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor,
                        previous_pixels: torch.Tensor | None = None) -> torch.Tensor:
        """Discrete mode: packed patches -> LM ids of the N codes per merged token (sum t*h*w / 4, N)."""
        merge = self.config.projector_config.merge_size
        previous = previous_pixels.to(self.dtype) if previous_pixels is not None else None
        features = merged_vit_features(self.visual, pixel_values.to(self.dtype), grid_thw, merge, previous)
        vq = self.config.visual_tokenizer_config
        return code_ids(self.visual_tokenizer.encode(features), self.config.text_config.vocab_size, vq.codebook_size)

    def embed_code_ids(self, ids_PN: torch.Tensor) -> torch.Tensor:
        """Visual code ids (P, N) -> one input vector per position, the sum of the N code embeddings (P, hidden).

        Rows are addressed relative to the text vocabulary, so resizing it (itemic tokens) shifts the
        block's ids without touching the table.
        """
        rows_PN = ids_PN - self.config.text_config.vocab_size
        return self.model.visual_embed_tokens(rows_PN).sum(1)

    def load_visual_tokenizer(self, path) -> None:
        """Discrete mode: load a tokenizer trained by the ``vq`` stage (its sizes must match the config)."""
        if self.config.vision_mode != "discrete":
            raise ConfigError("load_visual_tokenizer: the model is not in vision_mode='discrete'")
        trained = load_visual_tokenizer(path)
        ours = self.config.visual_tokenizer_config
        for key in ("num_codebooks", "codebook_size", "code_dim", "hidden_size"):
            if getattr(trained.config, key) != getattr(ours, key):
                raise ConfigError(f"visual tokenizer {path}: {key}={getattr(trained.config, key)} but the model "
                                  f"config has {getattr(ours, key)}")
        self.visual_tokenizer.load_state_dict(trained.state_dict(), strict=True)

    def _insert(self, embeds_BLD, input_ids, token_id: int, features_ND: torch.Tensor, what: str):
        mask_BL = input_ids == token_id
        n = int(mask_BL.sum())
        if n != features_ND.shape[0]:
            raise KeyeInputError(
                f"{what}: the prompt has {n} pad tokens but the vision tower produced {features_ND.shape[0]} "
                "features; each frame of h x w pixels needs h*w/784 pads"
            )
        return embeds_BLD.masked_scatter(mask_BL[..., None], features_ND.to(embeds_BLD.dtype))

    def _previous_frames(self, input_ids, pixel_values_videos, video_grid_thw) -> torch.Tensor | None:
        """With ``frame_difference``, each video patch one frame earlier (``previous_frame_pixels``), the videos
        told apart by the prompt's vision blocks; None without it. ``video_grid_thw``: one row per frame."""
        if not self.config.vision_config.frame_difference:
            return None
        if input_ids is None:
            raise KeyeInputError("frame_difference needs input_ids beside pixel_values_videos (the prompt's "
                                 "vision blocks say which frames belong to one video)")
        grids = grid_list(video_grid_thw)
        merge = self.config.projector_config.merge_size
        per_video = frames_per_video(input_ids, self.config, [h * w // merge**2 for _, h, w in grids])
        return previous_frame_pixels(pixel_values_videos, grids, per_video)

    def _embed(self, input_ids, inputs_embeds, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw):
        if inputs_embeds is None:
            inputs_embeds = self.model.embed_tokens(input_ids)
        if pixel_values is not None:
            feats = self.visual_features(pixel_values, image_grid_thw)
            inputs_embeds = self._insert(inputs_embeds, input_ids, self.config.image_token_id, feats, "images")
        if pixel_values_videos is not None:
            previous = self._previous_frames(input_ids, pixel_values_videos, video_grid_thw)
            feats = self.visual_features(pixel_values_videos, video_grid_thw, previous)
            inputs_embeds = self._insert(inputs_embeds, input_ids, self.config.video_token_id, feats, "videos")
        return inputs_embeds

    def _positions(self, input_ids, attention_mask, past_len, new_len, image_grid_thw, video_grid_thw,
                   segment_ids=None):
        if past_len == 0 and input_ids is not None:
            positions, self.rope_deltas = mrope_positions(
                input_ids, attention_mask[:, -new_len:], self.config, image_grid_thw, video_grid_thw, segment_ids
            )
            return positions
        text_BL = attention_mask.long().cumsum(-1)[:, -new_len:] - 1
        if self.rope_deltas is not None and past_len > 0:
            text_BL = text_BL + self.rope_deltas.to(text_BL.device)
        return text_BL.clamp(min=0)[None].expand(3, -1, -1)

    # ------------------------------------------------------------------ forward

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_router_logits: bool | None = None,
        output_hidden_states: bool | None = None,
        logits_to_keep: int = 0,
        sparse_logits: bool = False,
        segment_ids: torch.LongTensor | None = None,
        num_frames: torch.LongTensor | None = None,
        loss_chunk: int = 0,
        **kwargs,
    ) -> KeyeCausalLMOutput:
        """input_ids/attention_mask/labels: (B, L); labels are -100 outside assistant turns.

        ``sparse_logits=True`` (training): with labels, the head runs only where a label is set and
        ``logits`` is None. Assistant tokens are a small share of a video prompt, so this skips most of
        the vocabulary projection and its softmax; the loss is the same. ``loss_chunk`` > 0 then computes the
        head and its loss that many positions at a time (``keye.models.losses.head_cross_entropy``): memory
        O(loss_chunk x vocab) instead of O(L x vocab) when most positions carry a label.

        position_ids, if given, are (3, B, L) mRoPE positions (or (B, L) for text-only input);
        by default they are derived from the prompt's vision blocks.

        ``segment_ids`` (B, L) marks packed rows (``keye.data.collate.collate_packed``): the sample each
        token belongs to. Positions then restart per sample and attention stays inside each sample (a
        block-diagonal causal mask), so every sample gets the logits it gets alone. Training only: no
        cache. Packed rows, and padded batches without a cache, reach the decoder's kernel as run boundaries
        (``keye.models.attention``): varlen SDPA, a FlexAttention block mask or flash-attn's varlen call, in
        memory linear in L; ``eager`` builds the dense mask as the reference.

        ``num_frames`` (V,): frames per video, as the official processor returns it beside merged
        ``video_grid_thw`` rows; checked against the rows (see ``frame_grids``).
        """
        if video_grid_thw is not None:
            video_grid_thw = frame_grids(video_grid_thw, num_frames)
        elif num_frames is not None:
            raise KeyeInputError("num_frames was given without video_grid_thw")
        embeds_BLD = self._embed(input_ids, inputs_embeds, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw)
        B, L = embeds_BLD.shape[:2]
        past_len = past_key_values.get_seq_length() if past_key_values is not None else 0
        if attention_mask is None:
            # always pass a mask: with none, transformers reads jumps in position_ids as packed sequences
            attention_mask = torch.ones(B, past_len + L, dtype=torch.long, device=embeds_BLD.device)
        if position_ids is None:
            position_ids = self._positions(
                input_ids, attention_mask, past_len, L, image_grid_thw, video_grid_thw, segment_ids
            )
        decoder_mask, attention_kwargs = attention_mask, {}
        if segment_ids is not None or (past_key_values is None and not bool(attention_mask.all())):
            decoder_mask, attention_kwargs = self._run_attention(segment_ids, attention_mask, past_key_values,
                                                                 embeds_BLD.dtype)
        is_moe = self.config.is_moe
        want_router = is_moe and (bool(output_router_logits) or labels is not None)
        extra = {"output_router_logits": want_router} if is_moe else {}
        out = self.model(
            inputs_embeds=embeds_BLD,
            attention_mask=decoder_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            **attention_kwargs,
            **extra,
        )
        hidden_BLD = out.last_hidden_state
        loss = lm_loss = aux = z = logits = None
        if labels is not None and sparse_logits:
            lm_loss = self._sparse_lm_loss(hidden_BLD, labels, kwargs.get("num_items_in_batch"), loss_chunk)
        else:
            keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
            logits = self.lm_head(hidden_BLD[:, keep])
            if labels is not None:
                lm_loss = ForCausalLMLoss(logits, labels, self.config.text_config.vocab_size, **kwargs)
        loss = lm_loss
        router_logits = getattr(out, "router_logits", None) if is_moe else None
        if router_logits:
            text = self.config.text_config
            args = (router_logits, text.num_experts, text.num_experts_per_tok, attention_mask[:, -L:])
            aux = ROUTER_LOSSES["load_balancing"](*args)
            z = ROUTER_LOSSES["z_loss"](*args)
            if loss is not None:
                loss = loss + text.router_aux_loss_coef * aux.to(loss.device)
                if self.config.router_z_loss_coef:
                    loss = loss + self.config.router_z_loss_coef * z.to(loss.device)
        return KeyeCausalLMOutput(
            loss=loss,
            lm_loss=lm_loss,
            aux_loss=aux,
            z_loss=z,
            logits=logits,
            past_key_values=out.past_key_values,
            hidden_states=(*(out.hidden_states or ()), hidden_BLD) if output_hidden_states else None,
            router_logits=router_logits,
        )

    def _run_attention(self, segment_ids, attention_mask, past_key_values, dtype):
        """Mask and attention kwargs that keep attention inside each packed sample (``segment_ids``) or each
        padded row (a forward without cache), in the form the decoder's kernel takes (``keye.models.attention``)."""
        if segment_ids is not None and past_key_values is not None and past_key_values.get_seq_length() > 0:
            raise KeyeInputError("segment_ids (packed rows) are for training forwards; they cannot extend a cache")
        if segment_ids is not None and segment_ids.shape != attention_mask.shape:
            raise KeyeInputError(f"segment_ids {tuple(segment_ids.shape)} must match attention_mask "
                                 f"{tuple(attention_mask.shape)}")
        runs = Runs.of(attention_mask, segment_ids)
        return decoder_attention(self.model.config._attn_implementation, runs, attention_mask, dtype)

    def _sparse_lm_loss(self, hidden_BLD, labels_BL, num_items_in_batch=None, chunk: int = 0):
        """transformers' causal-LM loss (shift by one, ignore -100, sum / num_items or mean) computed
        from the supervised positions only, ``chunk`` of them at a time (``head_cross_entropy``)."""
        target_BL = labels_BL[:, 1:].to(hidden_BLD.device)
        keep_BL = target_BL != -100
        total = head_cross_entropy(self.lm_head, hidden_BLD[:, :-1][keep_BL], target_BL[keep_BL], chunk)
        if num_items_in_batch is not None:
            return total / num_items_in_batch
        return total / keep_BL.sum().clamp(min=1)

    def prepare_inputs_for_generation(self, *args, **kwargs):
        inputs = super().prepare_inputs_for_generation(*args, **kwargs)
        # our forward derives 3D positions itself (prefill: from the vision blocks; decode: + rope_deltas);
        # the 1D ones GenerationMixin builds would drop the vision layout
        inputs.pop("position_ids", None)
        return inputs

    # ------------------------------------------------------------------ embeddings API

    @torch.no_grad()
    def _pooled(self, token_mask_BL: torch.Tensor, normalize: bool, **inputs) -> torch.Tensor:
        out = self(**inputs, output_hidden_states=True, use_cache=False)
        hidden_BLD = out.hidden_states[-1].float()
        if not bool(token_mask_BL.any(-1).all()):
            raise KeyeInputError("every sample needs at least one token of the pooled kind")
        w_BL = token_mask_BL.float()
        pooled_BD = (hidden_BLD * w_BL[..., None]).sum(1) / w_BL.sum(1, keepdim=True)
        return F.normalize(pooled_BD, dim=-1) if normalize else pooled_BD

    @torch.no_grad()
    def _vit_pooled(self, token_mask_BL: torch.Tensor, normalize: bool, pixel_values, grid_thw,
                    previous_pixels=None) -> torch.Tensor:
        """Mean of the ViT's final (post-layernorm) patch features over each sample's patches: the encoder alone,
        no projector, no LM. A sample's patches are its pad tokens times merge**2, in prompt order."""
        previous = previous_pixels.to(self.dtype) if previous_pixels is not None else None
        feats_PD = self.visual(pixel_values.to(self.dtype), grid_thw, previous).float()
        merge = self.config.projector_config.merge_size
        patches_B = (token_mask_BL.sum(1) * merge * merge).tolist()
        if 0 in patches_B or sum(patches_B) != feats_PD.shape[0]:
            raise KeyeInputError(f"ViT pooling: {feats_PD.shape[0]} patches for per-sample pads x {merge}^2 = "
                                 f"{patches_B}; every sample needs its own visual input")
        pooled_BD = torch.stack([chunk.mean(0) for chunk in feats_PD.split(patches_B)])
        return F.normalize(pooled_BD, dim=-1) if normalize else pooled_BD

    def encode_video(self, input_ids, pixel_values_videos, video_grid_thw, attention_mask=None, normalize=False,
                     num_frames=None, pooling="decoder"):
        """One embedding per sample's video. Returns (B, hidden) for ``pooling="decoder"``, (B, vision hidden)
        for ``"vit"``.

        - ``decoder``: mean of the decoder's final (normed) hidden states over the ``<|video_pad|>`` tokens.
          Pooling after the LM, not after ``mlp_AR``, puts videos, images and text in one space, and lets the
          video tokens see the prompt (e.g. a title).
        - ``vit``: mean of the ViT's output over the video's patches, the vision encoder alone (as Keye's item
          side and Kelix embed items: content only, and the ViT runs without the LM).
        Grid layouts as in ``forward``.
        """
        mask = input_ids == self.config.video_token_id
        if attention_mask is not None:
            mask &= attention_mask.bool()
        if pooling == "vit":
            grids = frame_grids(video_grid_thw, num_frames)
            return self._vit_pooled(mask, normalize, pixel_values_videos, grids,
                                    self._previous_frames(input_ids, pixel_values_videos, grids))
        if pooling != "decoder":
            raise ConfigError(f"pooling must be 'decoder' or 'vit', got {pooling!r}")
        return self._pooled(
            mask, normalize, input_ids=input_ids, attention_mask=attention_mask,
            pixel_values_videos=pixel_values_videos, video_grid_thw=video_grid_thw, num_frames=num_frames,
        )

    def encode_image(self, input_ids, pixel_values, image_grid_thw, attention_mask=None, normalize=False,
                     pooling="decoder"):
        """Mean of the final hidden states over ``<|image_pad|>`` tokens (``decoder``), or of the ViT's output over
        the image's patches (``vit``), as ``encode_video``. Returns (B, hidden) / (B, vision hidden)."""
        mask = input_ids == self.config.image_token_id
        if attention_mask is not None:
            mask &= attention_mask.bool()
        if pooling == "vit":
            return self._vit_pooled(mask, normalize, pixel_values, image_grid_thw)
        if pooling != "decoder":
            raise ConfigError(f"pooling must be 'decoder' or 'vit', got {pooling!r}")
        return self._pooled(
            mask, normalize, input_ids=input_ids, attention_mask=attention_mask,
            pixel_values=pixel_values, image_grid_thw=image_grid_thw,
        )

    def encode_text(self, input_ids, attention_mask=None, normalize=False):
        """Mean of the final hidden states over real (unpadded) tokens. Returns (B, hidden)."""
        mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        return self._pooled(mask, normalize, input_ids=input_ids, attention_mask=attention_mask)


def discrete_from_continuous(model: KeyeForConditionalGeneration, tokenizer_path,
                             code_embeddings: torch.Tensor | None = None) -> KeyeForConditionalGeneration:
    """The discrete-mode twin of a continuous model: same ViT and LM weights, the trained tokenizer at
    ``tokenizer_path`` (the ``vq`` stage's ``tokenizer/`` folder), ``mlp_AR`` dropped and code embeddings (they
    train with the LM): ``code_embeddings`` (num_codes, hidden) if given (``fit_code_embeddings``), else fresh
    ones. This is how a pipeline switches an existing checkpoint to the Kelix path."""
    trained = load_visual_tokenizer(tokenizer_path)
    config = copy.deepcopy(model.config)
    config.vision_mode = "discrete"
    config.visual_tokenizer_config = trained.config
    twin = KeyeForConditionalGeneration(config).to(model.dtype)
    missing, unexpected = twin.load_state_dict(model.state_dict(), strict=False)
    new = ("visual_tokenizer.", "model.visual_embed_tokens.")
    if any(not k.startswith(new) for k in missing) or any(not k.startswith("mlp_AR.") for k in unexpected):
        raise ConfigError(f"discrete_from_continuous: unexpected weight mismatch (missing {missing[:3]}, "
                          f"unexpected {unexpected[:3]})")
    twin.visual_tokenizer.load_state_dict(trained.state_dict(), strict=True)
    if code_embeddings is not None:
        table = twin.model.visual_embed_tokens.weight
        if tuple(code_embeddings.shape) != tuple(table.shape):
            raise ConfigError(f"discrete_from_continuous: code_embeddings {tuple(code_embeddings.shape)}, the model's "
                              f"table is {tuple(table.shape)}")
        with torch.no_grad():
            table.copy_(code_embeddings)
    return twin
