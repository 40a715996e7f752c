"""Native-resolution SigLIP ViT of Keye-VL-1.5 (rotary -> attention -> layer -> encoder -> model).

Every image or video frame keeps its own patch grid. Patches of all frames are packed into one
sequence of shape (total_patches, C*14*14) in raster order (row by row, per frame), described by
``grid_thw`` (N, 3). A row may stand for several same-size frames (t > 1, the layout the official
Keye-VL-1.5 processor emits); attention is restricted to each frame whatever the grid says
("varlen", like flash-attn's ``cu_seqlens``) and computed exactly, so frames of different sizes
batch without padding.

Position information is twofold, as in the published model (Keye-VL-1.5 report, sec. 2.1; public
``KeyeSiglipVisionTransformer``): the learned 27x27 SigLIP table is interpolated bilinearly to the
frame's (h, w) grid and added to the patch embeddings, and a 2D RoPE over (row, column) rotates q
and k in every layer.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn
from transformers.models.siglip.modeling_siglip import SiglipMLP

from keye.errors import KeyeInputError
from keye.models.attention import varlen_sdpa
from keye.models.configuration import KeyeVisionConfig


def grid_list(grid_thw: torch.Tensor) -> list[tuple[int, int, int]]:
    """(N, 3) int tensor -> list of (t, h, w) python ints."""
    return [tuple(int(x) for x in row) for row in grid_thw.tolist()]


def frame_grids(grid_thw: torch.Tensor, num_frames: torch.Tensor | None = None) -> torch.Tensor:
    """Grid rows (N, 3), some possibly covering t > 1 same-size frames -> one (1, h, w) row per frame (sum t, 3).

    Keye-VL-1.5 encodes every frame on its own (report sec. 2.1), so a merged row is only a shorter way
    to write the same frames; splitting it gives the layout the model computes with. ``num_frames``
    (V,), frames per video as the official processor reports them, is checked against the rows: the
    frames must add up and no row may cover frames of two videos.
    """
    if grid_thw.ndim != 2 or grid_thw.shape[-1] != 3:
        raise KeyeInputError(f"grid_thw must have shape (N, 3), got {tuple(grid_thw.shape)}")
    t_N = grid_thw[:, 0]
    if bool((grid_thw <= 0).any()):
        raise KeyeInputError(f"grid_thw rows must be positive (t, h, w), got {grid_thw.tolist()}")
    if num_frames is not None:
        frames_V = torch.as_tensor(num_frames).reshape(-1).tolist()
        if sum(frames_V) != int(t_N.sum()):
            raise KeyeInputError(f"num_frames {frames_V} adds up to {sum(frames_V)} frames but video_grid_thw "
                                 f"holds {int(t_N.sum())} (the sum of its t column)")
        row_ends = set(t_N.cumsum(0).tolist())
        video_ends = torch.tensor(frames_V).cumsum(0).tolist()
        if any(v <= 0 for v in frames_V) or not set(video_ends) <= row_ends:
            raise KeyeInputError(f"num_frames {frames_V}: a video_grid_thw row (t column {t_N.tolist()}) "
                                 "covers frames of two videos; merged rows must stay inside one video")
    ones_N1 = torch.ones_like(grid_thw[:, :1])
    return torch.cat([ones_N1, grid_thw[:, 1:]], dim=1).repeat_interleave(t_N, dim=0)


def check_grid(pixel_values: torch.Tensor, grid_thw: torch.Tensor, patch_dim: int) -> None:
    if grid_thw.ndim != 2 or grid_thw.shape[-1] != 3:
        raise KeyeInputError(f"grid_thw must have shape (N, 3), got {tuple(grid_thw.shape)}")
    total = int(grid_thw.prod(-1).sum())
    if pixel_values.ndim != 2 or pixel_values.shape != (total, patch_dim):
        raise KeyeInputError(
            f"pixel_values must have shape (sum(t*h*w)={total}, {patch_dim}) for the given grid_thw, "
            f"got {tuple(pixel_values.shape)}"
        )


# ----------------------------------------------------------------------------- rotary


class VisionRotaryEmbedding2D(nn.Module):
    """2D RoPE: half of each head's rotary pairs encode the patch row, half the column.

    Matches the public ``SigLIPRotaryEmbedding(head_dim // 2)`` use: frequencies for row and column
    are concatenated, then duplicated for the rotate-half layout (flash-attn's non-interleaved
    ``apply_rotary_emb`` with ``cos.chunk(2)[0]`` is the same rotation).
    """

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        dim = head_dim // 2
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    @torch.no_grad()
    def forward(self, rows_N: torch.Tensor, cols_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """rows_N, cols_N: (N,) patch coordinates -> cos, sin of shape (N, head_dim), float32."""
        freqs_N = torch.cat(
            [rows_N[:, None].float() * self.inv_freq, cols_N[:, None].float() * self.inv_freq], dim=-1
        )
        emb = torch.cat([freqs_N, freqs_N], dim=-1)
        return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x_NHD: torch.Tensor, cos_ND: torch.Tensor, sin_ND: torch.Tensor) -> torch.Tensor:
    # float32 rotation as in the reference (q.float() ... .type_as(q)): bf16 angles drift for large grids
    x = x_NHD.float()
    out = x * cos_ND[:, None, :] + rotate_half(x) * sin_ND[:, None, :]
    return out.to(x_NHD.dtype)


# ----------------------------------------------------------------------------- attention


def varlen_eager(q_NHD, k_NHD, v_NHD, seqlens: list[int], scale: float, dropout: float = 0.0) -> torch.Tensor:
    """Reference: one softmax over the whole pack with a block-diagonal mask (O(N^2) memory)."""
    seq_id = torch.repeat_interleave(torch.arange(len(seqlens), device=q_NHD.device), torch.tensor(seqlens))
    scores_HNN = torch.einsum("nhd,mhd->hnm", q_NHD.float(), k_NHD.float()) * scale
    scores_HNN = scores_HNN.masked_fill(seq_id[:, None] != seq_id[None, :], float("-inf"))
    probs = F.dropout(scores_HNN.softmax(-1), p=dropout)
    return torch.einsum("hnm,mhd->nhd", probs, v_NHD.float()).to(q_NHD.dtype)


VISION_ATTENTION: dict[str, Callable[..., torch.Tensor]] = {"sdpa": varlen_sdpa, "eager": varlen_eager}


class VisionAttention(nn.Module):
    def __init__(self, config: KeyeVisionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scale = self.head_dim**-0.5
        self.dropout = config.attention_dropout
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.attention_impl = "sdpa"

    def forward(self, x_ND: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], seqlens: list[int]) -> torch.Tensor:
        q, k, v = (rearrange(p(x_ND), "n (h d) -> n h d", h=self.num_heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        attn = VISION_ATTENTION[self.attention_impl]
        o_NHD = attn(q, k, v, seqlens, self.scale, self.dropout if self.training else 0.0)
        return self.out_proj(rearrange(o_NHD, "n h d -> n (h d)"))


# ----------------------------------------------------------------------------- layers


class VisionEncoderLayer(nn.Module):
    """Pre-norm SigLIP block; the MLP is transformers' ``SiglipMLP`` (fc1 -> gelu_tanh -> fc2)."""

    def __init__(self, config: KeyeVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)

    def forward(self, x_ND, rope, seqlens):
        x_ND = x_ND + self.self_attn(self.layer_norm1(x_ND), rope, seqlens)
        return x_ND + self.mlp(self.layer_norm2(x_ND))


class VisionEncoder(nn.Module):
    def __init__(self, config: KeyeVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(VisionEncoderLayer(config) for _ in range(config.num_hidden_layers))
        self.rotary_pos_emb = VisionRotaryEmbedding2D(config.hidden_size // config.num_attention_heads, config.rope_theta)
        self.gradient_checkpointing = False

    def forward(self, x_ND: torch.Tensor, grids: list[tuple[int, int, int]]) -> torch.Tensor:
        """x_ND: (sum t*h*w, D) embedded patches; grids: (t, h, w) per row -> (sum t*h*w, D)."""
        rows, cols = [], []
        for t, h, w in grids:
            pos = torch.arange(h * w, device=x_ND.device).repeat(t)
            rows.append(pos // w)
            cols.append(pos % w)
        rope = self.rotary_pos_emb(torch.cat(rows), torch.cat(cols))
        # one attention sequence per frame, also for a row covering t > 1 frames: Keye-VL-1.5 never
        # attends across frames, and the official processor merges same-size frames into one row
        seqlens = [h * w for t, h, w in grids for _ in range(t)]
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x_ND = torch.utils.checkpoint.checkpoint(layer, x_ND, rope, seqlens, use_reentrant=False)
            else:
                x_ND = layer(x_ND, rope, seqlens)
        return x_ND


class FrameDifferenceEmbedding(nn.Linear):
    """The frame-difference patch embedding: starts at zero (here and in ``_init_weights``), so that a tower
    gains it without changing an output, and without drawing from the random generator a seeded stage
    draws from next."""

    def __init__(self, config: KeyeVisionConfig):
        super().__init__(config.num_channels * config.patch_size**2, config.hidden_size, bias=False)

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)


def enable_frame_difference(visual: "KeyeVisionModel") -> bool:
    """Give a built tower the frame-difference embedding (zero) and set its config; False if it had one."""
    embeddings = visual.vision_model.embeddings
    if embeddings.difference_embedding is not None:
        return False
    config = visual.vision_model.config
    config.frame_difference = True
    weight = embeddings.patch_embedding.weight
    embeddings.difference_embedding = FrameDifferenceEmbedding(config).to(weight.device, weight.dtype)
    return True


def previous_frame_pixels(pixel_values: torch.Tensor, grids: list[tuple[int, int, int]],
                          frames_per_video: list[int]) -> torch.Tensor:
    """Each patch of a video's frames, one frame earlier: per-frame ``grids`` rows (t = 1) in video order,
    ``frames_per_video`` adding up to them. A video's first frame, and a frame whose size differs from the
    one before (Slow-Fast sizes), keep their own patches, that is no difference."""
    if sum(frames_per_video) != len(grids) or any(t != 1 for t, _, _ in grids):
        raise KeyeInputError(f"frame differences need one (1, h, w) grid row per frame; got {len(grids)} rows for "
                             f"videos of {frames_per_video} frames")
    firsts = {int(k) for k in torch.tensor([0, *frames_per_video[:-1]]).cumsum(0).tolist()}
    shift = [0 if k in firsts or grids[k] != grids[k - 1] else h * w for k, (_, h, w) in enumerate(grids)]
    sizes = torch.tensor([h * w for _, h, w in grids])
    shift_P = torch.tensor(shift).repeat_interleave(sizes)
    index_P = torch.arange(len(shift_P)) - shift_P
    return pixel_values[index_P.to(pixel_values.device)]


class VisionEmbeddings(nn.Module):
    """Conv patch embedding plus the learned SigLIP position table, interpolated per grid."""

    def __init__(self, config: KeyeVisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.num_channels = config.num_channels
        self.grid = config.position_grid
        self.patch_embedding = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.position_embedding = nn.Embedding(self.grid * self.grid, config.hidden_size)
        self.difference_embedding = FrameDifferenceEmbedding(config) if config.frame_difference else None
        if config.packing_position_embeddings:
            self.packing_position_embedding = nn.Embedding(config.packing_position_embeddings, config.hidden_size)
            self.packing_position_embedding.weight.requires_grad_(False)

    def interpolated_positions(self, h: int, w: int) -> torch.Tensor:
        """Learned (G*G, D) table -> (h*w, D), bilinear with align_corners=False as in the reference."""
        table = rearrange(self.position_embedding.weight, "(gh gw) d -> 1 d gh gw", gh=self.grid)
        table = F.interpolate(table, size=(h, w), mode="bilinear", align_corners=False)
        return rearrange(table, "1 d h w -> (h w) d")

    def forward(self, pixel_values: torch.Tensor, grids: list[tuple[int, int, int]],
                previous_pixels: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values: (N, C*p*p) patches in raster order -> (N, D). ``previous_pixels`` (N, C*p*p): the same
        patches one sampled frame earlier (a frame with none passes its own), read where ``frame_difference``
        is on."""
        # a stride-p conv over one p x p patch is a matmul with the flattened kernel ((c p q) order, the
        # patches' own): same weights and result, without the conv kernel's overhead (~10% of a nano step)
        conv = self.patch_embedding
        x_ND = F.linear(pixel_values.to(conv.weight.dtype), conv.weight.flatten(1), conv.bias)
        if self.difference_embedding is not None and previous_pixels is not None:
            if previous_pixels.shape != pixel_values.shape:
                raise KeyeInputError(f"previous_pixels must have the shape of pixel_values {tuple(pixel_values.shape)}, "
                                     f"got {tuple(previous_pixels.shape)}")
            x_ND = x_ND + self.difference_embedding((pixel_values - previous_pixels).to(x_ND.dtype))
        cache: dict[tuple[int, int], torch.Tensor] = {}
        positions = []
        for t, h, w in grids:
            if (h, w) not in cache:
                cache[(h, w)] = self.interpolated_positions(h, w)
            positions.append(cache[(h, w)].repeat(t, 1))
        return x_ND + torch.cat(positions).to(x_ND.dtype)


class KeyeVisionTransformer(nn.Module):
    def __init__(self, config: KeyeVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.encoder = VisionEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor,
                previous_pixels: torch.Tensor | None = None) -> torch.Tensor:
        """pixel_values: (sum t*h*w, C*p*p); grid_thw: (N, 3), per-frame or merged rows -> features (sum t*h*w, D).
        ``previous_pixels``: see ``VisionEmbeddings.forward`` (``previous_frame_pixels`` builds it for videos)."""
        check_grid(pixel_values, grid_thw, self.config.num_channels * self.config.patch_size**2)
        grids = grid_list(grid_thw)
        x_ND = self.embeddings(pixel_values, grids, previous_pixels)
        return self.post_layernorm(self.encoder(x_ND, grids))


class KeyeVisionModel(nn.Module):
    """Holds the transformer under ``vision_model`` so weight names read ``visual.vision_model.*``."""

    def __init__(self, config: KeyeVisionConfig):
        super().__init__()
        self.vision_model = KeyeVisionTransformer(config)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor,
                previous_pixels: torch.Tensor | None = None) -> torch.Tensor:
        return self.vision_model(pixel_values, grid_thw, previous_pixels)
