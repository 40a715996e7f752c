"""Collision policies: what to do when two items get the same semantic ID. Every policy keeps one fixed length.

- ``none`` (OpenOneRec): codes stay as quantized; several pids may share a SID and the sid -> pids map (with
  counts) says which.
- ``suffix`` (TIGER, Rajput et al. 2023, sec. 3.1): one extra level numbers the items inside each collision
  group 0, 1, 2, ... (items without a collision get 0), so IDs are always unique; the extra level's vocabulary
  is the largest group size.
- ``reassign`` (LC-Rec, Zheng et al. 2024, style): inside a group, the item closest to its last-level centroid
  keeps its code; each other one moves to the nearest last-level code that no item under the same prefix uses.
  IDs come out unique whenever no prefix (first L-1 codes) holds more than K items; items past that stay
  collided and are counted in ``unresolved``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from keye.items.semantic_ids import ResidualKMeans


@dataclass(frozen=True)
class SemanticIds:
    codes_NM: torch.Tensor  # (N, M) int64, M = levels (+1 for the suffix policy)
    codebook_sizes: list[int]  # vocabulary of each of the M positions
    policy: str
    unresolved: int = 0  # items the policy promised to separate but could not


def group_ids(codes_NM: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(group_N, sizes_G)``: which identical-ID group each item is in, and each group's size."""
    _, group_N, sizes_G = torch.unique(codes_NM, dim=0, return_inverse=True, return_counts=True)
    return group_N, sizes_G


def rank_in_group(group_N: torch.Tensor, key_N: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of every item inside its group, by ``key_N`` (default: item order), ties by item order."""
    order = torch.arange(group_N.numel()) if key_N is None else torch.argsort(key_N, stable=True)
    order = order[torch.argsort(group_N[order], stable=True)]
    counts = torch.bincount(group_N)
    starts = torch.cumsum(counts, 0) - counts
    rank_N = torch.empty_like(group_N)
    rank_N[order] = torch.arange(group_N.numel()) - starts[group_N[order]]
    return rank_N


def _none(codes_NL: torch.Tensor, x_ND: torch.Tensor, quantizer: ResidualKMeans) -> SemanticIds:
    return SemanticIds(codes_NL, quantizer.codebook_sizes, "none")


def _suffix(codes_NL: torch.Tensor, x_ND: torch.Tensor, quantizer: ResidualKMeans) -> SemanticIds:
    group_N, sizes_G = group_ids(codes_NL)
    suffix_N = rank_in_group(group_N)
    codes_NM = torch.cat([codes_NL, suffix_N.unsqueeze(1)], 1)
    return SemanticIds(codes_NM, quantizer.codebook_sizes + [int(sizes_G.max())], "suffix")


def _reassign(codes_NL: torch.Tensor, x_ND: torch.Tensor, quantizer: ResidualKMeans) -> SemanticIds:
    last = quantizer.levels - 1
    k = quantizer.codebook_sizes[last]
    codes_NL = codes_NL.clone()
    residual_ND = quantizer.residual(x_ND, codes_NL, last)
    d2_N = (residual_ND - quantizer.centroids[last][codes_NL[:, last]]).pow(2).sum(1)
    group_N, sizes_G = group_ids(codes_NL)
    movers = torch.nonzero(rank_in_group(group_N, d2_N) > 0).squeeze(1)
    if movers.numel() == 0:
        return SemanticIds(codes_NL, quantizer.codebook_sizes, "reassign")
    prefix_N, _ = group_ids(codes_NL[:, :last]) if last else (torch.zeros_like(group_N), None)
    unresolved = 0
    for prefix in torch.unique(prefix_N[movers]).tolist():
        in_prefix = prefix_N == prefix
        used_K = torch.zeros(k, dtype=torch.bool)
        keep = in_prefix.clone()
        keep[movers] = False
        used_K[codes_NL[keep, last]] = True
        bucket_movers = movers[in_prefix[movers]]
        # movers that fit their centroid best pick first (deterministic, stable on item order)
        bucket_movers = bucket_movers[torch.argsort(d2_N[bucket_movers], stable=True)]
        d2_MK = quantizer.level_distances(residual_ND[bucket_movers], last)
        for row, item in enumerate(bucket_movers.tolist()):
            if bool(used_K.all()):
                unresolved += 1
                continue
            code = int(d2_MK[row].masked_fill(used_K, float("inf")).argmin())
            codes_NL[item, last] = code
            used_K[code] = True
    return SemanticIds(codes_NL, quantizer.codebook_sizes, "reassign", unresolved)


COLLISION_POLICIES: dict[str, Callable[[torch.Tensor, torch.Tensor, ResidualKMeans], SemanticIds]] = {
    "none": _none,
    "suffix": _suffix,
    "reassign": _reassign,
}


def apply_collision_policy(
    policy: str, codes_NL: torch.Tensor, x_ND: torch.Tensor, quantizer: ResidualKMeans
) -> SemanticIds:
    """Apply a registered policy to the quantizer's codes ``(N, L)`` of embeddings ``x_ND``."""
    return COLLISION_POLICIES[policy](codes_NL, x_ND, quantizer)


def sid_groups(codes_NM: torch.Tensor, pids: list) -> list[tuple[list[int], list]]:
    """The sid -> pids map as ``[(sid codes, [pids...]), ...]`` sorted by SID (OpenOneRec keeps this map)."""
    uniq_GM, group_N = torch.unique(codes_NM, dim=0, return_inverse=True)
    members: list[list] = [[] for _ in range(uniq_GM.shape[0])]
    for pid, g in zip(pids, group_N.tolist()):
        members[g].append(pid)
    return [(sid, m) for sid, m in zip(uniq_GM.tolist(), members)]
