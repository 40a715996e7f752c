"""How many bytes a training forward of a Keye model keeps for its backward: the activation half of a memory plan
(``keye train RECIPE --dry-run``; weights, gradients and optimizer states are counted in ``keye.recipe``).

Per token and block, the bytes are sums of the block's widths with fixed coefficients: each coefficient is one
tensor autograd saves, and they are read off the tensors the toolkit's own blocks save (measured with
``torch.autograd.graph.saved_tensors_hooks``; ``tests/models/test_memory_plan.py`` holds the formulas to those
measurements). Precision is the toolkit's: float32 weights, under ``bf16`` autocast or in float32. Under autocast
every linear keeps a bfloat16 copy of its input, and a bfloat16 copy of its weight until the backward; the MoE
experts (transformers' ``grouped_mm``) stay outside autocast, in float32.

Not counted: the ViT's patch merger and projector (a few widths per merged token), allocator slack, and the
transient buffers of a kernel while it runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from keye.models.configuration import KeyeConfig

BYTES = {"bf16": 2, "fp32": 4}


def _decoder_layer(text, precision: str) -> float:
    """Bytes one decoder layer saves per token (without the shared RoPE angles and the weight copies)."""
    D, H, Hk = text.hidden_size, text.num_attention_heads, text.num_key_value_heads
    d = getattr(text, "head_dim", None) or D // H
    q, kv = H * d, Hk * d
    moe = text.model_type == "qwen3_moe"
    if precision == "bf16":
        # q, k, v and the attention output in bf16 around SDPA, their norms' float32 inputs; the residual
        # stream and both RMSNorms in float32; a bf16 input copy per linear (q, k, v, gate, up; the router)
        b = 10 * q + 10 * kv + 8 * H + 4 * Hk + 8 + (24 if moe else 26) * D
        mlp = 8 * text.intermediate_size if not moe else 0
    else:
        b = 16 * q + 16 * kv + 8 * H + 4 * Hk + 8 + 24 * D
        mlp = 16 * text.intermediate_size if not moe else 0
    if moe:  # grouped_mm experts in float32: the k routed copies of each token, gate/up and the activation
        k, m, E = text.num_experts_per_tok, text.moe_intermediate_size, text.num_experts
        mlp = 8 * k * D + 16 * k * m + 4 * E + 42 * k
    return b + mlp


def _vit_layer(vision, precision: str) -> float:
    """Bytes one ViT layer saves per patch (without the shared 2D RoPE angles and the weight copies)."""
    D, F, H = vision.hidden_size, vision.intermediate_size, vision.num_attention_heads
    if precision == "bf16":
        return 26 * D + 4 * F + 4 * H + 24
    return 36 * D + 8 * F + 4 * H + 24


def _linear_weights(module_config, vision: bool) -> int:
    """Elements of the weights a layer's linears cast to bf16 under autocast (MoE experts are not cast)."""
    if vision:
        D, F = module_config.hidden_size, module_config.intermediate_size
        return 4 * D * D + 2 * D * F
    D, H, Hk = module_config.hidden_size, module_config.num_attention_heads, module_config.num_key_value_heads
    d = getattr(module_config, "head_dim", None) or D // H
    attention = 2 * D * H * d + 2 * D * Hk * d
    if module_config.model_type == "qwen3_moe":
        return attention + D * module_config.num_experts
    return attention + 3 * D * module_config.intermediate_size


@dataclass
class ActivationPlan:
    """Bytes a training step holds besides weights, gradients and optimizer states, by part."""

    decoder: float  # the decoder layers' saved tensors (or, checkpointed, their inputs plus one layer)
    vision: float  # the same for the ViT layers
    weight_copies: float  # bf16 copies of the weights, kept for the backward under autocast
    loss: float  # the LM head and cross-entropy at their peak
    working: float  # the backward's gradients of one block's tensors, about as large as what the block saved

    @property
    def total(self) -> float:
        return self.decoder + self.vision + self.weight_copies + self.loss + self.working


def activation_plan(config: KeyeConfig, tokens: int, *, precision: str = "bf16", checkpointing: bool = False,
                    loss_chunk: int = 0, label_tokens: int | None = None, patches: int = 0) -> ActivationPlan:
    """Activation bytes of one micro-batch of ``tokens`` decoder tokens (all rows together), ``patches`` of which
    come through the ViT (four patches per merged vision token), ``label_tokens`` of them supervised (default:
    all), under ``precision`` (``bf16`` autocast or ``fp32``), with or without per-block activation checkpointing
    and the chunked head loss (``loss_chunk`` positions at a time; 0: all at once)."""
    if precision not in BYTES:
        raise ValueError(f"precision must be one of {sorted(BYTES)}, got {precision!r}")
    text, vision = config.text_config, config.vision_config
    n_text, n_vit = text.num_hidden_layers, vision.num_hidden_layers
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    per_layer = _decoder_layer(text, precision) * tokens
    per_vit = _vit_layer(vision, precision) * patches
    rope = 8 * head_dim * tokens + 8 * (vision.hidden_size // vision.num_attention_heads) * patches
    if checkpointing:
        # each block keeps its float32 input; the backward recomputes one block at a time
        decoder = n_text * 4 * text.hidden_size * tokens + per_layer
        vit = n_vit * 4 * vision.hidden_size * patches + per_vit
        copies = 0.0
    else:
        decoder, vit = n_text * per_layer, n_vit * per_vit
        copies = 2.0 * (n_text * _linear_weights(text, False) + n_vit * _linear_weights(vision, True))
    if precision == "fp32":
        copies = 0.0
    labels = tokens if label_tokens is None else label_tokens
    rows = min(labels, loss_chunk) if loss_chunk else labels
    # logits (bf16 and their float32 copy, or float32), log-softmax and its gradient for ``rows`` positions
    per_logit = 10 if precision == "bf16" else 12
    loss = per_logit * rows * text.vocab_size + BYTES[precision] * labels * text.hidden_size
    return ActivationPlan(decoder=decoder + rope, vision=vit + 4 * 588 * patches, weight_copies=copies, loss=loss,
                          working=max(per_layer, per_vit))
