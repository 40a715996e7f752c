"""The ``mlp_AR`` projector of Keye-VL-1.5: 2x2 patch merge, then LayerNorm -> Linear -> GELU -> Linear.

Keye-VL-1.5 moved the LayerNorm after the merge (over 4 * 1152 = 4608 features), where 1.0 normed
each patch before merging (public ``KeyeVL1_5Projector`` vs ``Projector``). Patches stay in raster
order, so a merged token gathers rows (2i, 2i+1) x columns (2j, 2j+1) of its frame.
"""

from __future__ import annotations

import torch
from einops import rearrange
from torch import nn
from transformers.activations import ACT2FN

from keye.errors import KeyeInputError
from keye.models.configuration import KeyeProjectorConfig
from keye.models.vision import grid_list


def merge_patches(features_ND: torch.Tensor, grid_thw: torch.Tensor, merge: int) -> torch.Tensor:
    """(sum t*h*w, D) raster-ordered patches -> (sum t*h*w / m^2, m*m*D), each m x m block as one row.

    Shared by the projector and the discrete visual tokenizer, which both read the merged features.
    """
    merged, start = [], 0
    for t, h, w in grid_list(grid_thw):
        if h % merge or w % merge:
            raise KeyeInputError(f"grid {(t, h, w)}: h and w must be multiples of the merge size {merge}")
        n = t * h * w
        merged.append(
            rearrange(features_ND[start : start + n], "(t h p w q) d -> (t h w) (p q d)", t=t, h=h // merge, p=merge, q=merge)
        )
        start += n
    return torch.cat(merged)


class KeyeProjector(nn.Module):
    def __init__(self, config: KeyeProjectorConfig, vision_hidden: int, text_hidden: int):
        super().__init__()
        self.merge = config.merge_size
        merged = vision_hidden * self.merge**2
        self.pre_norm = nn.LayerNorm(merged, eps=config.layer_norm_eps)
        self.linear_1 = nn.Linear(merged, merged)
        self.act = ACT2FN[config.hidden_act]
        self.linear_2 = nn.Linear(merged, text_hidden)

    def forward(self, features_ND: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """features_ND: (sum t*h*w, D_vision) raster-ordered -> (sum t*h*w / m^2, D_text)."""
        return self.project_merged(merge_patches(features_ND, grid_thw, self.merge))

    def project_merged(self, merged_PF: torch.Tensor) -> torch.Tensor:
        """Already merged features (P, m^2 * D_vision) -> (P, D_text)."""
        return self.linear_2(self.act(self.linear_1(self.pre_norm(merged_PF))))
