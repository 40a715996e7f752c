"""Sequence packing without cross-contamination between the packed samples.

Several tokenised samples share one row of ``max_length`` tokens. Three things keep them apart:

1. ``position_ids`` restart at 0 for every sample (RoPE sees each sample as if alone);
2. attention stays inside each sample: ``cu_seqlens`` for varlen kernels (flash-attn's
   ``cu_seqlens_q/k`` convention; ``block_causal_mask`` is its dense (L, L) reference);
   ``keye.data.collate.collate_packed`` hands the model per-token ``segment_ids`` instead, from which
   ``KeyeForConditionalGeneration`` derives the restarting 3D mRoPE ids and the run boundaries each
   attention kernel takes (``keye.models.attention``);
3. labels: the label at each sample's first token is -100, so the shifted next-token loss never
   asks the last token of one sample to predict the first token of the next.

Labels arrive already masked to assistant tokens (-100 elsewhere, as the processor builds them);
packing only adds the boundary masking. Packing is first-fit decreasing, deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from keye.errors import KeyeInputError

IGNORE_INDEX = -100


@dataclass
class PackedRow:
    """One packed row.

    input_ids, labels: (L,) int64 with L = sum of the sample lengths (<= max_length; pad with ``pad``).
    position_ids: (L,) or (P, L) int64, restarting per sample (P > 1 for multi-axis RoPE ids).
    cu_seqlens: (n + 1,) int32 sample boundaries, starting at 0 and ending at L.
    sample_indices: which input samples the row holds, in order.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    sample_indices: list[int]

    def pad(self, length: int, pad_id: int) -> PackedRow:
        """Right-pad to ``length``; the padding is one extra segment in cu_seqlens with ignored labels."""
        extra = length - len(self.input_ids)
        if extra < 0:
            raise KeyeInputError(f"packed row of {len(self.input_ids)} tokens does not fit {length}")
        if extra == 0:
            return self
        pos_pad = torch.arange(extra).expand(*self.position_ids.shape[:-1], extra)
        return PackedRow(
            torch.cat([self.input_ids, torch.full((extra,), pad_id, dtype=self.input_ids.dtype)]),
            torch.cat([self.labels, torch.full((extra,), IGNORE_INDEX, dtype=self.labels.dtype)]),
            torch.cat([self.position_ids, pos_pad], dim=-1),
            torch.cat([self.cu_seqlens, torch.tensor([length], dtype=self.cu_seqlens.dtype)]),
            self.sample_indices,
        )


def plan_packs(lengths: list[int], max_length: int, names: list | None = None) -> list[list[int]]:
    """First-fit decreasing: sample indices per row, each row's total length <= max_length. ``names``
    (default: the indices) name the samples in the error for one that cannot fit."""
    too_long = [(names[i] if names is not None else i, n) for i, n in enumerate(lengths) if n > max_length]
    if too_long:
        raise KeyeInputError(f"samples longer than the pack length {max_length} (sample, tokens): {too_long[:5]}")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        slot = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if slot is None:
            rows.append([i])
            room.append(max_length - lengths[i])
        else:
            rows[slot].append(i)
            room[slot] -= lengths[i]
    return rows


def pack(
    input_ids: list[torch.Tensor],
    labels: list[torch.Tensor],
    max_length: int,
    position_ids: list[torch.Tensor] | None = None,
    names: list | None = None,
) -> list[PackedRow]:
    """Pack samples (each (T_i,) ids and labels; optional (T_i,) or (P, T_i) position ids) into rows;
    ``names`` name the samples in errors (``plan_packs``)."""
    if len(input_ids) != len(labels):
        raise KeyeInputError(f"pack: {len(input_ids)} input_ids but {len(labels)} labels")
    out = []
    for members in plan_packs([len(x) for x in input_ids], max_length, names):
        ids, labs, pos = [], [], []
        for i in members:
            lab = labels[i].clone()
            lab[0] = IGNORE_INDEX
            ids.append(input_ids[i])
            labs.append(lab)
            pos.append(position_ids[i] if position_ids is not None else torch.arange(len(input_ids[i])))
        lengths = torch.tensor([len(x) for x in ids], dtype=torch.int32)
        cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0, dtype=torch.int32)])
        out.append(PackedRow(torch.cat(ids), torch.cat(labs), torch.cat(pos, dim=-1), cu, members))
    return out


def segment_ids(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(L,) int64: the index of the sample each token of a packed row belongs to."""
    return torch.repeat_interleave(torch.arange(len(cu_seqlens) - 1), (cu_seqlens[1:] - cu_seqlens[:-1]).long())


def same_segment_causal(segment_L: torch.Tensor) -> torch.Tensor:
    """(..., L) segment ids -> (..., L, L) bool, True where query i may attend key j: j <= i and the same
    segment value."""
    L = segment_L.shape[-1]
    same = segment_L[..., :, None] == segment_L[..., None, :]
    return same & torch.ones(L, L, dtype=torch.bool, device=segment_L.device).tril()


def block_causal_mask(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """(L, L) bool, True where query i may attend key j: same sample and j <= i."""
    return same_segment_causal(segment_ids(cu_seqlens))
