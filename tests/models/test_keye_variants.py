"""Registered variants: the big ones on the meta device must have the published names and shapes."""

import pytest
import torch

from keye.errors import ConfigError
from keye.models import VARIANTS, build_config, build_model
from keye.models.adapter import KeyeStateDictAdapter
from keye.models.variants import NANO_SPECIAL_BASE
from keye.processing import SPECIAL_TOKENS, load_nano_processor

# (name, shape) spot checks against the published Keye-VL-1.5-8B layout
PUBLISHED_8B = {
    "visual.vision_model.embeddings.patch_embedding.weight": (1152, 3, 14, 14),
    "visual.vision_model.embeddings.position_embedding.weight": (729, 1152),
    "visual.vision_model.embeddings.packing_position_embedding.weight": (32768, 1152),
    "visual.vision_model.encoder.layers.26.self_attn.q_proj.weight": (1152, 1152),
    "visual.vision_model.encoder.layers.26.mlp.fc1.weight": (4304, 1152),
    "visual.vision_model.encoder.layers.26.layer_norm2.bias": (1152,),
    "visual.vision_model.post_layernorm.weight": (1152,),
    "mlp_AR.pre_norm.weight": (4608,),
    "mlp_AR.linear_1.weight": (4608, 4608),
    "mlp_AR.linear_2.weight": (4096, 4608),
    "model.embed_tokens.weight": (151936, 4096),
    "model.layers.35.self_attn.q_proj.weight": (4096, 4096),
    "model.layers.35.self_attn.k_proj.weight": (1024, 4096),
    "model.layers.35.self_attn.q_norm.weight": (128,),
    "model.layers.35.mlp.gate_proj.weight": (12288, 4096),
    "model.norm.weight": (4096,),
    "lm_head.weight": (151936, 4096),
}
PUBLISHED_30B = {
    "model.embed_tokens.weight": (151936, 2048),
    "model.layers.47.self_attn.q_proj.weight": (4096, 2048),
    "model.layers.47.self_attn.k_proj.weight": (512, 2048),
    "model.layers.47.mlp.gate.weight": (128, 2048),
    "model.layers.47.mlp.experts.127.gate_proj.weight": (768, 2048),
    "model.layers.47.mlp.experts.127.down_proj.weight": (2048, 768),
    "mlp_AR.linear_2.weight": (2048, 4608),
    "lm_head.weight": (151936, 2048),
}


@pytest.mark.parametrize(
    "name, expected, low, high",
    [("keye-vl-1.5-8b", PUBLISHED_8B, 8.3e9, 9.0e9), ("keye-vl-2.0-30b-a3b", PUBLISHED_30B, 30.5e9, 31.6e9)],
)
def test_big_variants_have_published_names_and_shapes(name, expected, low, high):
    with torch.device("meta"):
        model = build_model(name)
    published = KeyeStateDictAdapter(model.config).to_published(model.state_dict())
    for key, shape in expected.items():
        assert tuple(published[key].shape) == shape, key
    assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in published)
    count = sum(p.numel() for p in model.parameters())
    print(f"{name}: {count / 1e9:.3f} B parameters")
    assert low < count < high


def test_variants_differ_only_in_sizes():
    keys = None
    for name in VARIANTS:
        cfg = build_config(name).to_dict()
        flat = set(cfg["vision_config"]) | set(cfg["projector_config"]) | {k for k in cfg if not k.endswith("_config")}
        keys = keys or flat
        assert flat == keys, name


def test_unknown_variant_or_field_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown Keye variant"):
        build_config("keye-huge")
    with pytest.raises(ConfigError, match="unknown config field"):
        build_config("keye-nano", not_a_field=1)


def test_overrides_are_validated_like_a_fresh_config():
    with pytest.raises(ConfigError, match="vision_mode must be one of"):
        build_config("keye-nano", vision_mode="pixels")
    with pytest.raises(ConfigError, match="mrope_section"):
        build_config("keye-nano", mrope_section=[1, 2, 3])
    assert build_config("keye-nano", vision_mode="discrete").vision_mode == "discrete"


def test_nano_config_ids_match_the_shipped_tokenizer():
    tok = load_nano_processor().tokenizer
    cfg = build_config("keye-nano")
    assert tok.convert_tokens_to_ids(SPECIAL_TOKENS) == list(range(NANO_SPECIAL_BASE, NANO_SPECIAL_BASE + 10))
    assert tok.convert_tokens_to_ids("<|video_pad|>") == cfg.video_token_id
    assert tok.convert_tokens_to_ids("<|image_pad|>") == cfg.image_token_id
    assert tok.convert_tokens_to_ids("<|vision_start|>") == cfg.vision_start_token_id
    assert len(tok) <= cfg.text_config.vocab_size
