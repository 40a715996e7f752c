"""Policy-gradient losses for the RL stage, one small registered function each.

Every loss takes per-token log-probs of the sampled completions under the current policy
(``logps_BT``, with gradient) and under the rollout policy (``old_logps_BT``, no gradient), the
group-normalised ``advantages_B`` (or ``(B, T)`` where a loss supports per-token advantages) and the
completion mask, and returns ``(loss_B, stats)``: ONE LOSS PER SEQUENCE. Aggregation is the
sequence mean (GSPO's choice, and TRL's ``loss_type="grpo"``), which the loop takes as
``loss_B.sum() / sequences_in_minibatch`` so micro-batching never changes the gradient.

* ``gspo``: GSPO (Zheng et al. 2025, arXiv 2507.18071): the importance ratio is per sequence,
  ``s_i = exp(mean_t log(pi/pi_old))``, clipped asymmetrically to ``[1 - clip_low, 1 + clip_high]``
  (the paper's 3e-4 / 4e-4: a sequence-level ratio is a geometric mean, so its clip range is
  orders of magnitude tighter than PPO's 0.2).
* ``gspo_token``: GSPO-token (same paper, eq. 11): ``s_i,t = sg[s_i] * pi_t / sg[pi_t]`` so each
  token can carry its own advantage; with one advantage per sequence it equals ``gspo`` in value
  and gradient.
* ``grpo``: the token-level ratio of GRPO/PPO, per-sequence token mean (Shao et al. 2024).

The optional KL term (``kl_k3``) is Schulman's k3 estimator against a frozen reference policy,
added per token before the sequence mean, as TRL does.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from keye.errors import ConfigError
from keye.registry import registrar


@dataclass
class PolicyLossConfig:
    name: str = "gspo"  # one of POLICY_LOSSES
    clip_low: float = 3e-4  # ratio clipped below at 1 - clip_low (GSPO paper; use 0.2 for grpo)
    clip_high: float = 4e-4  # ratio clipped above at 1 + clip_high (GSPO paper; use 0.2/0.28 for grpo)
    beta: float = 0.0  # KL coefficient against the reference policy; 0 = no KL and no reference model


Stats = dict[str, torch.Tensor]
# (logps_BT, old_logps_BT, advantages_B, mask_BT, cfg) -> (loss_B, stats)
PolicyLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, PolicyLossConfig],
                      tuple[torch.Tensor, Stats]]
POLICY_LOSSES: dict[str, PolicyLoss] = {}


register_policy_loss = registrar(POLICY_LOSSES)


def masked_mean_B(x_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Mean over each row's unmasked tokens (an empty row gives 0, not NaN). Returns (B,)."""
    mask = mask_BT.to(x_BT.dtype)
    return (x_BT * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)


def _clipped_objective(ratio, advantages, cfg: PolicyLossConfig):
    """-min(r A, clip(r) A) and where the clip is active (the gradient is zero there)."""
    clipped = ratio.clamp(1 - cfg.clip_low, 1 + cfg.clip_high)
    loss = -torch.min(ratio * advantages, clipped * advantages)
    active = ((ratio < 1 - cfg.clip_low) & (advantages < 0)) | ((ratio > 1 + cfg.clip_high) & (advantages > 0))
    return loss, active


@register_policy_loss("gspo")
def gspo_loss(logps_BT, old_logps_BT, advantages_B, mask_BT, cfg: PolicyLossConfig):
    """Sequence-level ratio and clip. advantages_B: (B,). Returns loss_B (B,) and stats."""
    if advantages_B.ndim != 1:
        raise ConfigError("loss gspo needs one advantage per sequence; use gspo_token for per-token advantages")
    log_ratio_B = masked_mean_B(logps_BT - old_logps_BT, mask_BT)
    ratio_B = torch.exp(log_ratio_B)
    loss_B, clipped_B = _clipped_objective(ratio_B, advantages_B, cfg)
    return loss_B, {"clip_fraction": clipped_B.float().mean(), "ratio": ratio_B.detach().mean()}


@register_policy_loss("gspo_token")
def gspo_token_loss(logps_BT, old_logps_BT, advantages_B, mask_BT, cfg: PolicyLossConfig):
    """GSPO-token: the sequence ratio's value with a per-token gradient path. advantages: (B,) or (B, T)."""
    log_ratio_B = masked_mean_B(logps_BT - old_logps_BT, mask_BT)
    ratio_BT = torch.exp(log_ratio_B.detach()[:, None] + logps_BT - logps_BT.detach())
    adv_BT = advantages_B[:, None].expand_as(logps_BT) if advantages_B.ndim == 1 else advantages_B
    loss_BT, clipped_BT = _clipped_objective(ratio_BT, adv_BT, cfg)
    stats = {"clip_fraction": masked_mean_B(clipped_BT.float(), mask_BT).mean(),
             "ratio": log_ratio_B.exp().detach().mean()}
    return masked_mean_B(loss_BT, mask_BT), stats


@register_policy_loss("grpo")
def grpo_loss(logps_BT, old_logps_BT, advantages_B, mask_BT, cfg: PolicyLossConfig):
    """Token-level ratio (PPO/GRPO), token mean per sequence. advantages: (B,) or (B, T)."""
    ratio_BT = torch.exp(logps_BT - old_logps_BT)
    adv_BT = advantages_B[:, None].expand_as(logps_BT) if advantages_B.ndim == 1 else advantages_B
    loss_BT, clipped_BT = _clipped_objective(ratio_BT, adv_BT, cfg)
    stats = {"clip_fraction": masked_mean_B(clipped_BT.float(), mask_BT).mean(),
             "ratio": masked_mean_B(ratio_BT.detach(), mask_BT).mean()}
    return masked_mean_B(loss_BT, mask_BT), stats


def kl_k3(logps_BT: torch.Tensor, ref_logps_BT: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || pi_ref): exp(d) - d - 1 with d = ref - logp (>= 0, unbiased)."""
    d = ref_logps_BT - logps_BT
    return torch.exp(d) - d - 1


def sequence_loss(
    logps_BT: torch.Tensor,
    old_logps_BT: torch.Tensor,
    advantages_B: torch.Tensor,
    mask_BT: torch.Tensor,
    cfg: PolicyLossConfig,
    ref_logps_BT: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Stats]:
    """The registered policy loss plus ``beta`` * KL, per sequence. Returns loss_B (B,) and stats."""
    if cfg.name not in POLICY_LOSSES:
        raise ConfigError(f"loss.name: {cfg.name!r} is not one of {sorted(POLICY_LOSSES)}")
    loss_B, stats = POLICY_LOSSES[cfg.name](logps_BT, old_logps_BT, advantages_B, mask_BT, cfg)
    if cfg.beta:
        if ref_logps_BT is None:
            raise ConfigError("loss.beta > 0 needs reference log-probs (the loop keeps a frozen reference policy)")
        kl_B = masked_mean_B(kl_k3(logps_BT, ref_logps_BT), mask_BT)
        loss_B = loss_B + cfg.beta * kl_B
        stats["kl"] = kl_B.detach().mean()
    return loss_B, stats
