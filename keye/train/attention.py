"""Guided attention: read one decoder layer's attention weights while the layer keeps the model's kernel,
and the auxiliary loss that pulls a head's attention from chosen positions onto chosen targets.

The text stage shapes the lookup and motion heads with it (``keye.train.stages.text``), the next-token stages
the head that reads an asked object's visual tokens (``keye.train.stages.lm``, ``grounding``).
"""

from __future__ import annotations

import copy
import math
import sys

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

TAPPED = "keye_tapped"  # the attention implementation name of the one layer guidance reads


class AttentionTap:
    """Keeps the queries and keys (after RoPE) of one decoder layer's attention from each forward, and gives
    the log attention probabilities of a head from them: what eager attention would return, while the layer
    keeps the model's kernel. Only that layer's attention module is switched (to an implementation that
    records and passes through), so guidance costs one head's (B, L, L) scores and a few rows of another's,
    not eager attention on every layer. The weights hold for right- or left-padded batches, not packed rows."""

    def __init__(self, layer: nn.Module, detach_input: bool = False):
        self.attention = layer.self_attn
        self.config = self.attention.config
        # detach_input: the kept queries and keys are recomputed from the layer's input with its gradient
        # stopped, so a loss on these weights trains the layer's query and key projections and nothing below
        self.detach_input, self._hook, self._input = detach_input, None, None
        if detach_input:
            self._hook = self.attention.register_forward_pre_hook(self._capture, with_kwargs=True)
        # transformers keeps "eager" out of the registry: each modeling file has its own
        eager = sys.modules[type(self.attention).__module__].eager_attention_forward
        self.inner = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager)
        self.attention.config = copy.copy(self.config)
        self.attention.config._attn_implementation = TAPPED
        self.attention.keye_tap = self
        self.query_BHLD = self.key_BKLD = None

    def _capture(self, module, args, kwargs) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        self._input = (hidden, kwargs["position_embeddings"] if "position_embeddings" in kwargs else args[1])

    def _detached_query_key(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's queries and keys after RoPE, as its forward computes them, from its detached input."""
        hidden_BLD, (cos, sin) = self._input
        attn, hidden_BLD = self.attention, hidden_BLD.detach()
        shape = (*hidden_BLD.shape[:-1], -1, attn.head_dim)
        query = attn.q_norm(attn.q_proj(hidden_BLD).view(shape)).transpose(1, 2)
        key = attn.k_norm(attn.k_proj(hidden_BLD).view(shape)).transpose(1, 2)
        rotate = sys.modules[type(attn).__module__].apply_rotary_pos_emb
        return rotate(query, key, cos.detach(), sin.detach())

    def keep(self, query_BHLD: torch.Tensor, key_BKLD: torch.Tensor, scaling: float | None) -> None:
        if self.detach_input:
            query_BHLD, key_BKLD = self._detached_query_key()
        self.query_BHLD, self.key_BKLD = query_BHLD, key_BKLD
        self.groups = query_BHLD.shape[1] // key_BKLD.shape[1]
        self.scaling = scaling if scaling is not None else query_BHLD.shape[-1] ** -0.5

    def log_attention(self, head: int, mask_BL: torch.Tensor, rows: tuple[torch.Tensor, torch.Tensor] | None = None
                      ) -> torch.Tensor:
        """Log attention probabilities of ``head`` in the last forward (float32), causal, over the keys
        ``mask_BL`` marks real (and each query's own position, so no row is empty): (B, L, L), or (G, L) for
        the query rows ``rows`` = (batch indices, positions) alone."""
        q_BLD, k_BLD = self.query_BHLD[:, head], self.key_BKLD[:, head // self.groups]
        L = q_BLD.shape[1]
        positions = torch.arange(L, device=q_BLD.device)
        if rows is None:
            scores = q_BLD.float() @ k_BLD.float().transpose(-1, -2)
            allowed = (positions[None, :] <= positions[:, None]) & mask_BL.bool()[:, None, :]
            allowed = allowed | torch.eye(L, dtype=torch.bool, device=q_BLD.device)
        else:
            b, pos = rows
            scores = torch.einsum("gd,gld->gl", q_BLD[b, pos].float(), k_BLD[b].float())
            allowed = ((positions[None, :] <= pos[:, None]) & mask_BL.bool()[b]) | (positions[None, :] == pos[:, None])
        return (scores * self.scaling).masked_fill(~allowed, float("-inf")).log_softmax(-1)

    def remove(self) -> None:
        if self._hook is not None:
            self._hook.remove()
        self.attention.config = self.config
        del self.attention.keye_tap


def _tapped_attention(module, query, key, value, attention_mask, scaling=None, **kwargs):
    module.keye_tap.keep(query, key, scaling)
    return module.keye_tap.inner(module, query, key, value, attention_mask, scaling=scaling, **kwargs)


AttentionInterface.register(TAPPED, _tapped_attention)


FLOOR = math.log(1e-6)  # no gradient below a millionth of the attention: the log's slope there is huge


def attention_on(tap: AttentionTap, head: int, mask_BL: torch.Tensor, rows: list[tuple[int, int, list[int]]]
                 ) -> torch.Tensor:
    """Minus the log of ``head``'s summed attention from each (row, position) on its target positions, averaged."""
    b = torch.tensor([r[0] for r in rows], device=mask_BL.device)
    pos = torch.tensor([r[1] for r in rows], device=mask_BL.device)
    log_GL = tap.log_attention(head, mask_BL, rows=(b, pos))
    hits = [(g, t) for g, (_, _, targets) in enumerate(rows) for t in targets]  # one scatter, not one per row
    g, t = torch.tensor(hits, dtype=torch.long, device=log_GL.device).T
    on_GL = torch.zeros_like(log_GL, dtype=torch.bool)
    on_GL[g, t] = True
    return -torch.logsumexp(log_GL.masked_fill(~on_GL, float("-inf")), -1).clamp_min(FLOOR).mean()
