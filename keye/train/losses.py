"""Training losses shared by stages."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def siglip_sigmoid_loss(
    image_emb_BD: torch.Tensor, text_emb_BD: torch.Tensor, logit_scale: torch.Tensor, logit_bias: torch.Tensor
) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023, eq. 1) on L2-normalised embeddings.

    Every (image i, text j) pair is a binary problem, positive only on the diagonal; the loss is summed
    over texts and averaged over images, so it does not need a global softmax over the batch.
    ``logit_scale`` is the log-temperature (t = exp(logit_scale)), ``logit_bias`` the learned bias b.
    """
    image_emb_BD = F.normalize(image_emb_BD, dim=-1)
    text_emb_BD = F.normalize(text_emb_BD, dim=-1)
    logits_BB = text_emb_BD @ image_emb_BD.T * logit_scale.exp() + logit_bias
    labels_BB = 2 * torch.eye(len(logits_BB), device=logits_BB.device, dtype=logits_BB.dtype) - 1
    return -F.logsigmoid(labels_BB * logits_BB).sum(-1).mean()


def region_sigmoid_loss(
    patch_emb_PD: torch.Tensor, phrase_emb_KD: torch.Tensor, target_P: torch.Tensor,
    logit_scale: torch.Tensor, logit_bias: torch.Tensor,
) -> torch.Tensor:
    """SigLIP's sigmoid loss between patches and grounded phrases: every (patch p, phrase k) pair is a
    binary problem, positive where ``target_P[p] == k``; a patch with target -1 (no box) is a negative for
    every phrase. Summed over phrases, averaged over patches. With one patch per phrase and
    ``target = arange`` it is ``siglip_sigmoid_loss`` itself."""
    patch_emb_PD = F.normalize(patch_emb_PD, dim=-1)
    phrase_emb_KD = F.normalize(phrase_emb_KD, dim=-1)
    logits_PK = patch_emb_PD @ phrase_emb_KD.T * logit_scale.exp() + logit_bias
    k_K = torch.arange(phrase_emb_KD.shape[0], device=target_P.device)
    labels_PK = (target_P[:, None] == k_K).to(logits_PK.dtype) * 2 - 1
    return -F.logsigmoid(labels_PK * logits_PK).sum(-1).mean()
