"""Attention over packed sequences without a dense mask, for the ViT (one sequence per frame) and the decoder
(one causal sequence per packed sample).

A packed row holds several samples; a padded training batch is the same thing with one sample per row and
padding around it. Either way attention must stay inside each run of tokens, and an (L, L) mask for that
costs 4 L^2 bytes per row (64 GiB at 128K tokens). Each decoder kernel gets the run boundaries in its own form
(``DECODER_ATTENTION``):

| decoder ``attn_implementation`` | receives | memory |
| --- | --- | --- |
| ``eager`` | an additive (B, 1, L, L) mask: the reference | O(L^2) |
| ``varlen_sdpa`` (what ``sdpa`` resolves to on a Keye model) | ``cu_seq_lens_*``: causal SDPA per run | O(L) |
| ``flex_attention`` | a document-causal ``BlockMask`` built from block-level run bounds | O((L / 128)^2) |
| ``flash_attention_{2,3,4}`` | ``cu_seq_lens_*`` over the flattened rows (flash-attn's varlen call) | O(L) |

``varlen_sdpa`` is registered with transformers' ``AttentionInterface``: it is transformers' own ``sdpa`` for
every call that carries no run boundaries (generation, unpadded batches), so a Keye model loses nothing by
resolving ``sdpa`` to it. FlexAttention has no backward on CPU (torch raises), so on CPU it serves
inference only; training there takes ``varlen_sdpa``, whose SDPA picks the flash kernel on CPU as on GPU.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from keye.errors import ConfigError, KeyeInputError

VARLEN_SDPA = "varlen_sdpa"
FLEX_BLOCK = 128  # FlexAttention's default sparse block


def varlen_sdpa(q_NHD: torch.Tensor, k_NHD: torch.Tensor, v_NHD: torch.Tensor, seqlens: list[int], scale: float,
                dropout: float = 0.0, causal: bool = False) -> torch.Tensor:
    """Exact attention inside each of the consecutive sequences of a flattened batch, through SDPA.

    q_NHD: (N, H, D), k_NHD / v_NHD: (N, H_kv, D) with H a multiple of H_kv (grouped-query attention), and
    ``sum(seqlens) == N``. Sequences of equal length are stacked into one batched SDPA call, so a clip of
    same-sized frames or a row of equal samples costs one kernel launch; no sequence sees another's keys.
    Returns (N, H, D).
    """
    out = None
    gqa = q_NHD.shape[1] != k_NHD.shape[1]
    starts = torch.tensor([0, *seqlens[:-1]], device=q_NHD.device).cumsum(0)
    lengths = torch.tensor(seqlens, device=q_NHD.device)
    for length in sorted(set(seqlens)):
        idx_SL = starts[lengths == length][:, None] + torch.arange(length, device=q_NHD.device)
        q, k, v = (rearrange(t[idx_SL], "s l h d -> s h l d") for t in (q_NHD, k_NHD, v_NHD))
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=scale, is_causal=causal, enable_gqa=gqa)
        if out is None:  # SDPA's dtype: under autocast it can differ from q's (a norm hands q over in float32)
            out = o.new_empty(q_NHD.shape)
        out[idx_SL] = rearrange(o, "s h l d -> s l h d")
    return out if out is not None else torch.empty_like(q_NHD)


# ----------------------------------------------------------------------------- runs of a batch


@dataclass
class Runs:
    """The runs of tokens attention must stay inside: each packed sample, and each stretch of padding.

    run_BL: (B, L) index of the run each token belongs to, counted over the flattened batch (so it grows
    along every row and a row always starts a new run). cu_seqlens: (R + 1,) int32 run boundaries over the
    B * L flattened tokens (flash-attn's ``cu_seqlens``). max_length: the longest run.
    """

    run_BL: torch.Tensor
    cu_seqlens: torch.Tensor
    max_length: int
    # one sample per row, each a prefix of its row (right padding): plain causal attention over the whole
    # row is then exact for every real token, whose window holds only its own sample
    right_padded: bool = False

    @classmethod
    def of(cls, attention_mask_BL: torch.Tensor, segment_ids_BL: torch.Tensor | None = None) -> Runs:
        """Runs of a padded batch (``segment_ids_BL`` None: one sample per row) or of packed rows (the sample
        each token belongs to, ``keye.data.collate.collate_packed``). Padding (mask 0) never joins a sample."""
        real_BL = attention_mask_BL.bool()
        seg_BL = torch.zeros_like(attention_mask_BL, dtype=torch.long) if segment_ids_BL is None else segment_ids_BL
        seg_BL = torch.where(real_BL, seg_BL.to(real_BL.device), -1)
        starts_BL = torch.ones_like(real_BL)
        starts_BL[:, 1:] = seg_BL[:, 1:] != seg_BL[:, :-1]
        run_BL = starts_BL.flatten().cumsum(0).view_as(seg_BL) - 1
        lengths_R = torch.bincount(run_BL.flatten())
        cu = torch.zeros(len(lengths_R) + 1, dtype=torch.int32, device=run_BL.device)
        cu[1:] = lengths_R.cumsum(0)
        right_padded = segment_ids_BL is None and bool((real_BL[:, 1:] <= real_BL[:, :-1]).all())
        return cls(run_BL, cu, int(lengths_R.max()), right_padded)

    def flash_kwargs(self) -> dict:
        """What transformers' flash path (and ``varlen_sdpa``) takes for padding-free varlen attention."""
        return {"cu_seq_lens_q": self.cu_seqlens, "cu_seq_lens_k": self.cu_seqlens,
                "max_length_q": self.max_length, "max_length_k": self.max_length}


# ----------------------------------------------------------------------------- the kernels' inputs


def dense_causal_mask(runs: Runs, dtype: torch.dtype) -> torch.Tensor:
    """Additive (B, 1, L, L) mask: query i sees key j when j <= i in the same run. The eager reference:
    transformers' eager path adds it to the scores. Every query sees at least itself, so no softmax row is
    all masked (which is NaN)."""
    run_BL = runs.run_BL
    L = run_BL.shape[-1]
    allowed_BLL = (run_BL[:, :, None] == run_BL[:, None, :]) & torch.ones(L, L, dtype=torch.bool,
                                                                            device=run_BL.device).tril()
    mask_BLL = torch.zeros(allowed_BLL.shape, dtype=dtype, device=run_BL.device)
    return mask_BLL.masked_fill(~allowed_BLL, torch.finfo(dtype).min)[:, None]


def document_block_mask(runs: Runs, block: int = FLEX_BLOCK):
    """FlexAttention ``BlockMask`` for causal attention inside runs, from block-level bounds: O((L / block)^2).

    Runs grow along a row, so query block i and key block j <= i share a run exactly when j's last run
    reaches i's first; the pair is full (no per-token mask) when both blocks are whole and lie inside one
    run. ``create_block_mask`` would evaluate the mask on all L^2 pairs unless compiled.
    """
    from torch.nn.attention.flex_attention import BlockMask

    run_BL = runs.run_BL
    B, L = run_BL.shape
    n = -(-L // block)
    first_BN = run_BL[:, ::block]
    ends = torch.clamp(torch.arange(1, n + 1, device=run_BL.device) * block, max=L) - 1
    last_BN = run_BL[:, ends]
    whole_N = (ends - torch.arange(n, device=run_BL.device) * block + 1) == block
    q_idx, k_idx = torch.arange(n, device=run_BL.device)[:, None], torch.arange(n, device=run_BL.device)[None, :]
    touch_BNN = (k_idx <= q_idx) & (last_BN[:, None, :] >= first_BN[:, :, None])
    one_run_BN = (first_BN == last_BN) & whole_N
    full_BNN = ((k_idx < q_idx) & one_run_BN[:, :, None] & one_run_BN[:, None, :]
                & (first_BN[:, :, None] == first_BN[:, None, :]))
    partial_BNN = touch_BNN & ~full_BNN

    def kv_blocks(m_BNN: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        order = torch.argsort(m_BNN.to(torch.int8), dim=-1, descending=True, stable=True)
        return m_BNN.sum(-1).to(torch.int32)[:, None], order.to(torch.int32)[:, None]

    def mask_mod(b, h, q, k):
        return (run_BL[b, q] == run_BL[b, k]) & (q >= k)

    return BlockMask.from_kv_blocks(*kv_blocks(partial_BNN), *kv_blocks(full_BNN), BLOCK_SIZE=block,
                                    mask_mod=mask_mod, seq_lengths=(L, L))


def _eager(runs: Runs, mask_BL: torch.Tensor, dtype: torch.dtype):
    return dense_causal_mask(runs, dtype), {}


def _varlen(runs: Runs, mask_BL: torch.Tensor, dtype: torch.dtype):
    # an all-ones 2D mask: transformers then builds no mask (the runs are in the kwargs) and does not read
    # the restarting 3D positions as packed sequences of its own. Right-padded rows need no runs at all:
    # one causal call over the batch instead of one per run length (padding outputs are never read)
    return torch.ones_like(mask_BL), {} if runs.right_padded else runs.flash_kwargs()


def _flex(runs: Runs, mask_BL: torch.Tensor, dtype: torch.dtype):
    return document_block_mask(runs), {}


# decoder attn_implementation -> (runs, the 2D attention mask, dtype) -> (what the decoder takes as its mask,
# extra keyword arguments its attention layers receive)
DECODER_ATTENTION: dict[str, Callable[[Runs, torch.Tensor, torch.dtype], tuple[object, dict]]] = {
    "eager": _eager,
    VARLEN_SDPA: _varlen,
    "flex_attention": _flex,
    "flash_attention_2": _varlen,
    "flash_attention_3": _varlen,
    "flash_attention_4": _varlen,
}


def decoder_attention(impl: str, runs: Runs, mask_BL: torch.Tensor, dtype: torch.dtype) -> tuple[object, dict]:
    """The decoder's mask and attention kwargs for ``runs`` under attention implementation ``impl``."""
    if impl not in DECODER_ATTENTION:
        raise ConfigError(f"packed rows and padded training batches need a decoder attention in "
                          f"{sorted(DECODER_ATTENTION)} (sdpa resolves to {VARLEN_SDPA}); the decoder uses {impl!r}")
    return DECODER_ATTENTION[impl](runs, mask_BL, dtype)


# ----------------------------------------------------------------------------- transformers registration


def varlen_sdpa_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          cu_seq_lens_q=None, **kwargs):
    """transformers attention function: its ``sdpa`` unless the call carries ``cu_seq_lens_q`` (runs over the
    flattened batch, ``Runs.flash_kwargs``); then causal SDPA inside each run. query: (B, H, L, D), key /
    value: (B, H_kv, L, D); returns (B, L, H, D) and no weights, as every transformers attention function."""
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if attention_mask is not None:  # a dense mask here would mean the O(L^2) path was taken after all
        raise KeyeInputError("varlen_sdpa: run boundaries and a mask were both given")
    B, H, L, _ = query.shape
    q, k, v = (rearrange(t, "b h l d -> (b l) h d") for t in (query, key, value))
    out_NHD = varlen_sdpa(q, k, v, cu_seq_lens_q.diff().tolist(), scaling, dropout, causal=True)
    return rearrange(out_NHD, "(b l) h d -> b l h d", b=B), None


AttentionInterface.register(VARLEN_SDPA, varlen_sdpa_attention)
ALL_MASK_ATTENTION_FUNCTIONS.register(VARLEN_SDPA, sdpa_mask)
