"""Registered Keye variants: one line each, differing only in sizes.

``keye-vl-1.5-8b`` reproduces the published Keye-VL-1.5-8B shapes (SigLIP-so400m + Qwen3-8B-shaped
dense decoder, vocab 151936, untied head); ``keye-vl-2.0-30b-a3b`` swaps in the Qwen3-30B-A3B MoE
decoder; ``keye-nano`` is an MoE small enough to train on two CPU cores.
"""

from __future__ import annotations

from collections.abc import Callable

from keye.errors import ConfigError
from keye.models.configuration import KeyeConfig

# Keye-nano's tokenizer (keye/models/assets/keye-nano-tokenizer) puts its 16 special tokens after
# 2000 BPE tokens, in the order of keye.processing.SPECIAL_TOKENS; the table is padded to 2048 rows.
NANO_SPECIAL_BASE = 2000
QWEN_IDS = dict(image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653)
NANO_IDS = dict(
    image_token_id=NANO_SPECIAL_BASE + 5,
    video_token_id=NANO_SPECIAL_BASE + 6,
    vision_start_token_id=NANO_SPECIAL_BASE + 3,
    vision_end_token_id=NANO_SPECIAL_BASE + 4,
)

SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, image_size=384)


def keye_config(vision: dict, text: dict, ids: dict, mrope_section=None, **extra) -> KeyeConfig:
    return KeyeConfig(vision_config=vision, text_config=text, mrope_section=mrope_section, **ids, **extra)


def _qwen3(layers, hidden, ffn, heads, kv, vocab, ctx, theta):
    return dict(model_type="qwen3", num_hidden_layers=layers, hidden_size=hidden, intermediate_size=ffn,
                num_attention_heads=heads, num_key_value_heads=kv, head_dim=128, vocab_size=vocab,
                max_position_embeddings=ctx, rope_theta=theta, rms_norm_eps=1e-6, tie_word_embeddings=False)


def _qwen3_moe(layers, hidden, ffn, heads, kv, head_dim, experts, top_k, moe_ffn, vocab, ctx, theta):
    return dict(model_type="qwen3_moe", num_hidden_layers=layers, hidden_size=hidden, intermediate_size=ffn,
                num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, num_experts=experts,
                num_experts_per_tok=top_k, moe_intermediate_size=moe_ffn, norm_topk_prob=True, vocab_size=vocab,
                max_position_embeddings=ctx, rope_theta=theta, rms_norm_eps=1e-6, tie_word_embeddings=False,
                router_aux_loss_coef=0.001)


VARIANTS: dict[str, Callable[[], KeyeConfig]] = {
    "keye-nano": lambda: keye_config(
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=112,
             packing_position_embeddings=0),
        _qwen3_moe(4, 128, 256, 4, 2, 32, 4, 2, 128, 2048, 4096, 10000.0), NANO_IDS,
        visual_tokenizer_config=dict(num_codebooks=8, codebook_size=256, code_dim=8, hidden_size=256)),
    "keye-vl-1.5-8b": lambda: keye_config(
        SO400M, _qwen3(36, 4096, 12288, 32, 8, 151936, 131072, 1000000.0), QWEN_IDS, [16, 24, 24]),
    "keye-vl-2.0-30b-a3b": lambda: keye_config(
        SO400M, _qwen3_moe(48, 2048, 6144, 32, 4, 128, 128, 8, 768, 151936, 262144, 10000000.0), QWEN_IDS,
        [16, 24, 24]),
}


def build_config(name: str, **overrides) -> KeyeConfig:
    """Config of a registered variant; ``overrides`` set top-level KeyeConfig fields."""
    if name not in VARIANTS:
        raise ConfigError(f"unknown Keye variant {name!r}; known: {', '.join(sorted(VARIANTS))}")
    config = VARIANTS[name]()
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise ConfigError(f"variant {name}: unknown config field {key!r}")
        setattr(config, key, value)
    config.validate()  # overrides get the same checks as a config built from scratch
    return config


def build_model(name: str, **overrides):
    """A randomly initialised ``KeyeForConditionalGeneration`` (wrap in ``torch.device('meta')`` for shapes)."""
    from keye.models.modeling import KeyeForConditionalGeneration

    return KeyeForConditionalGeneration(build_config(name, **overrides))
