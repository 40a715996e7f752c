"""The activation formulas of the memory plan (keye.models.memory) against the bytes the blocks really save for
their backward, measured with saved_tensors_hooks, for dense and MoE decoder layers and the ViT layer, under
bf16 autocast and in float32, at two sets of widths (so no coefficient fits by coincidence)."""

import pytest
import torch
from transformers import Qwen3Config, Qwen3MoeConfig
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3RotaryEmbedding
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeDecoderLayer

from keye.models import build_config
from keye.models.configuration import KeyeVisionConfig
from keye.models.memory import _decoder_layer, _linear_weights, _vit_layer, activation_plan
from keye.models.vision import VisionEncoderLayer, VisionRotaryEmbedding2D

WIDTHS = [dict(hidden_size=48, intermediate_size=80, moe_intermediate_size=40, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2),
          dict(hidden_size=40, intermediate_size=72, moe_intermediate_size=24, num_attention_heads=6,
               num_key_value_heads=3, head_dim=8, num_experts=6, num_experts_per_tok=3)]


def saved_bytes(module, run, precision) -> int:
    """Bytes of the distinct tensors (by storage) the forward saves for the backward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in module.parameters()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    torch.manual_seed(0)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            run()
    return sum(seen.values())


def per_token_and_fixed(measure) -> tuple[float, float]:
    """(bytes per token, bytes independent of the length) from two lengths."""
    a, b = measure(120), measure(200)
    return (b - a) / 80, a - 120 * (b - a) / 80


def decoder_layer(kind, widths):
    common = dict(num_hidden_layers=1, vocab_size=64, **{k: v for k, v in widths.items()})
    if kind == "moe":
        config = Qwen3MoeConfig(**common)
        config._experts_implementation = "grouped_mm"  # the toolkit's default experts
        layer = Qwen3MoeDecoderLayer(config, 0)
    else:
        config = Qwen3Config(**{k: v for k, v in common.items() if k not in (
            "moe_intermediate_size", "num_experts", "num_experts_per_tok")})
        layer = Qwen3DecoderLayer(config, 0)
    config._attn_implementation = "sdpa"
    return config, layer


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("kind", ["dense", "moe"])
@pytest.mark.parametrize("widths", WIDTHS, ids=["a", "b"])
def test_decoder_layer_formula_equals_the_saved_tensors(kind, precision, widths):
    config, layer = decoder_layer(kind, widths)
    rotary = Qwen3RotaryEmbedding(config)

    def measure(T):
        x = torch.randn(1, T, config.hidden_size, requires_grad=True)
        positions = torch.arange(T)[None]
        angles = rotary(x, positions)
        return saved_bytes(layer, lambda: layer(x, attention_mask=None, position_embeddings=angles,
                                                position_ids=positions), precision)

    per_token, fixed = per_token_and_fixed(measure)
    rope = 8 * config.head_dim  # cos and sin, shared by all layers of a model (counted once in the plan)
    assert per_token == pytest.approx(_decoder_layer(config, precision) + rope, rel=0.01)
    copies = 2 * _linear_weights(config, vision=False) if precision == "bf16" else 0
    assert fixed == pytest.approx(copies, abs=64)


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("widths", [(48, 80, 4), (64, 72, 2)], ids=["a", "b"])
def test_vit_layer_formula_equals_the_saved_tensors(precision, widths):
    hidden, ffn, heads = widths
    config = KeyeVisionConfig(hidden_size=hidden, intermediate_size=ffn, num_attention_heads=heads, num_hidden_layers=1)
    layer = VisionEncoderLayer(config)
    head_dim = config.hidden_size // config.num_attention_heads
    rotary = VisionRotaryEmbedding2D(head_dim, 10000.0)

    def measure(T):
        x = torch.randn(T, config.hidden_size, requires_grad=True)
        rope = rotary(torch.arange(T) // 10, torch.arange(T) % 10)
        return saved_bytes(layer, lambda: layer(x, rope, [T // 2, T - T // 2]), precision)

    per_token, fixed = per_token_and_fixed(measure)
    assert per_token == pytest.approx(_vit_layer(config, precision) + 8 * head_dim, rel=0.01)
    copies = 2 * _linear_weights(config, vision=True) if precision == "bf16" else 0
    assert fixed == pytest.approx(copies, abs=160)  # + the index tensors of the per-length attention groups


def test_the_switches_shrink_the_plan_where_they_should():
    config = build_config("keye-vl-1.5-8b")
    plain = activation_plan(config, 32768, patches=4 * 16384)
    checkpointed = activation_plan(config, 32768, patches=4 * 16384, checkpointing=True)
    chunked = activation_plan(config, 32768, patches=4 * 16384, checkpointing=True, loss_chunk=4096)
    assert checkpointed.decoder < plain.decoder / 10 and checkpointed.vision < plain.vision / 5
    assert checkpointed.weight_copies == 0 < plain.weight_copies
    assert chunked.loss < checkpointed.loss / 7  # 4096 of 32768 positions' logits at a time
    assert chunked.loss == pytest.approx(10 * 4096 * 151936 + 2 * 32768 * 4096)
