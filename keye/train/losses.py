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
