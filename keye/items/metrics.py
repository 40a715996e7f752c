"""Semantic-ID quality metrics, each with an explicit definition (N items, D dims, L levels, K_l codes at l).

- ``recon_mse``: mean over items and dims of ``(x - x_hat)^2``, ``x_hat`` = sum of the item's centroids
  (OpenOneRec ``ResKmeans.calc_loss`` "loss").
- ``rel_loss``: mean over items and dims of ``|x - x_hat| / (max(|x|, |x_hat|) + 1e-4)`` (OpenOneRec "rel_loss").
- ``relative_sq_error``: ``sum ||x - x_hat||^2 / sum ||x||^2`` (share of the energy the IDs lose).
- ``utilisation[l]``: distinct codes used at level l / K_l.
- ``entropy_bits[l]``: Shannon entropy (bits) of the code histogram at level l; ``entropy_norm[l]`` divides it by
  ``log2 K_l`` (1.0 = perfectly uniform usage).
- ``perplexity[l]``: ``2 ** entropy_bits[l]``, the number of equally used codes with the same entropy (K_l at
  best). Utilisation can read 100% while one code holds half the items; perplexity cannot.
- ``largest_code_share[l]``: share of the items that the most used code of level l holds.
- ``collision_rate``: ``1 - unique SIDs / N``.
- ``collided_share``: share of items whose SID at least one other item also has.
- ``largest_group``: most items sharing one SID.
- ``prefix_collision_rate[l]``: ``1 - unique prefixes of length l+1 / N`` for l = 0..M-1 (the last equals
  ``collision_rate``).
"""

from __future__ import annotations

import math

import torch


def reconstruction_metrics(x_ND: torch.Tensor, recon_ND: torch.Tensor) -> dict[str, float]:
    x_ND, recon_ND = x_ND.double(), recon_ND.double()
    err_ND = x_ND - recon_ND
    rel = err_ND.abs() / (torch.maximum(x_ND.abs(), recon_ND.abs()) + 1e-4)
    return {
        "recon_mse": float(err_ND.pow(2).mean()),
        "rel_loss": float(rel.mean()),
        "relative_sq_error": float(err_ND.pow(2).sum() / x_ND.pow(2).sum().clamp(min=1e-30)),
    }


def code_usage_metrics(codes_NM: torch.Tensor, codebook_sizes: list[int]) -> dict[str, list[float]]:
    util, ent, ent_norm, ppl, top = [], [], [], [], []
    for level, k in enumerate(codebook_sizes):
        counts = torch.bincount(codes_NM[:, level], minlength=k).double()
        p = counts[counts > 0] / counts.sum()
        h = float(-(p * p.log2()).sum())
        util.append(float((counts > 0).sum()) / k)
        ent.append(h)
        ent_norm.append(h / math.log2(k) if k > 1 else 0.0)
        ppl.append(2.0**h)
        top.append(float(counts.max() / counts.sum()))
    return {"utilisation": util, "entropy_bits": ent, "entropy_norm": ent_norm, "perplexity": ppl,
            "largest_code_share": top}


def collision_metrics(codes_NM: torch.Tensor) -> dict[str, float | int | list[float]]:
    n = codes_NM.shape[0]
    _, _, sizes_G = torch.unique(codes_NM, dim=0, return_inverse=True, return_counts=True)
    prefix = [1.0 - torch.unique(codes_NM[:, : l + 1], dim=0).shape[0] / n for l in range(codes_NM.shape[1])]
    return {
        "collision_rate": 1.0 - sizes_G.numel() / n,
        "collided_share": float(sizes_G[sizes_G > 1].sum()) / n,
        "largest_group": int(sizes_G.max()),
        "prefix_collision_rate": prefix,
    }


def semantic_id_metrics(
    x_ND: torch.Tensor, recon_ND: torch.Tensor, codes_NM: torch.Tensor, codebook_sizes: list[int]
) -> dict:
    """All of the above for one set of IDs; ``recon_ND`` decodes the quantized levels of ``codes_NM``."""
    return {
        "items": int(codes_NM.shape[0]),
        **reconstruction_metrics(x_ND, recon_ND),
        **code_usage_metrics(codes_NM, codebook_sizes),
        **collision_metrics(codes_NM),
    }


def format_metrics(metrics: dict) -> str:
    """One metric per line, lists as ``[a, b, c]`` with 4 significant digits."""

    def fmt(v):
        if isinstance(v, list):
            return "[" + ", ".join(fmt(x) for x in v) + "]"
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    width = max(len(k) for k in metrics)
    return "\n".join(f"{k:<{width}}  {fmt(v)}" for k, v in metrics.items())
