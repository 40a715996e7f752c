"""Router losses for the MoE decoder, as small registered functions.

``load_balancing`` is transformers' own Switch-Transformer auxiliary loss (Fedus et al. 2021, eq. 4),
reused rather than copied so it stays identical to ``Qwen3MoeForCausalLM``. ``z_loss`` is the ST-MoE
router z-loss (Zoph et al. 2022, eq. 5): the mean squared log-partition of the router logits, which
keeps logits small and routing numerically stable in bf16.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func


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
