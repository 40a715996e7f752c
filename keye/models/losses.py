"""Losses of the model: the LM head's cross-entropy in chunks, and the MoE router losses as small registered
functions.

``head_cross_entropy`` never holds the logits of more than ``chunk`` positions: a 128K-token row would
otherwise materialise 128K x 151,936 float32 logits (74 GiB) and as much again for their gradient.

``load_balancing`` is transformers' own Switch-Transformer auxiliary loss (Fedus et al. 2021, eq. 4),
reused rather than copied so it stays identical to ``Qwen3MoeForCausalLM``. ``z_loss`` is the ST-MoE
router z-loss (Zoph et al. 2022, eq. 5): the mean squared log-partition of the router logits, which
keeps logits small and routing numerically stable in bf16.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func


def _head_loss_sum(head: nn.Module, hidden_ND: torch.Tensor, target_N: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden_ND).float(), target_N, reduction="sum")


def head_cross_entropy(head: nn.Module, hidden_ND: torch.Tensor, target_N: torch.Tensor, chunk: int = 0) -> torch.Tensor:
    """Summed cross-entropy of ``head(hidden_ND)`` (N, V) against ``target_N`` (N,), ``chunk`` rows at a time.

    Each chunk's logits are dropped after its loss and recomputed in the backward (non-reentrant
    checkpointing, through the head module itself, so sharded heads gather their weights as usual): peak
    memory O(chunk x V) instead of O(N x V), for one more head matmul. ``chunk`` 0, or N <= chunk, is the
    plain head. Logits are taken in float32 either way, as transformers' causal-LM loss does.
    """
    if not chunk or len(target_N) <= chunk:
        return _head_loss_sum(head, hidden_ND, target_N)
    total = hidden_ND.new_zeros((), dtype=torch.float32)
    for start in range(0, len(target_N), chunk):
        part = slice(start, start + chunk)
        total = total + checkpoint(_head_loss_sum, head, hidden_ND[part], target_N[part], use_reentrant=False)
    return total


def load_balancing(router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int, attention_mask) -> torch.Tensor:
    """router_logits: per layer (B*L, E); attention_mask: (B, L) or None."""
    return load_balancing_loss_func(router_logits, num_experts, top_k, attention_mask)


def z_loss(router_logits: tuple[torch.Tensor, ...], num_experts: int, top_k: int, attention_mask) -> torch.Tensor:
    """Mean over real tokens and layers of logsumexp(router logits)^2."""
    logits_TE = torch.cat([r.float() for r in router_logits], dim=0)
    z_T = torch.logsumexp(logits_TE, dim=-1) ** 2
    if attention_mask is None:
        return z_T.mean()
    keep_T = attention_mask.reshape(-1).bool().repeat(len(router_logits)).to(z_T.device)
    return z_T[keep_T].mean()


ROUTER_LOSSES: dict[str, Callable[..., torch.Tensor]] = {"load_balancing": load_balancing, "z_loss": z_loss}
