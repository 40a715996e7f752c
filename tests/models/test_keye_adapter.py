"""Published-layout adapter: a tiny random checkpoint written in the published naming round-trips."""

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import Qwen3MoeForCausalLM

from keye.models import build_model
from keye.models.adapter import INDEX_NAME, load_published, read_published, save_published, write_published


def _published_nano_state(model):
    """Random tensors under the published names, written independently of the adapter."""
    g = torch.Generator().manual_seed(11)
    text = model.config.text_config
    state = {}
    for name, p in model.state_dict().items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name.removesuffix(".gate_up_proj")
            for e in range(text.num_experts):
                for proj in ("gate", "up"):
                    state[f"{prefix}.{e}.{proj}_proj.weight"] = torch.randn(
                        text.moe_intermediate_size, text.hidden_size, generator=g) * 0.05
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name.removesuffix(".down_proj")
            for e in range(text.num_experts):
                state[f"{prefix}.{e}.down_proj.weight"] = torch.randn(
                    text.hidden_size, text.moe_intermediate_size, generator=g) * 0.05
        else:
            state[name] = torch.randn(p.shape, generator=g) * 0.05
    state["visual.vision_model.head.probe"] = torch.randn(1, 1, 64, generator=g)  # unused by Keye's forward
    return state


def test_published_checkpoint_round_trips(tmp_path):
    torch.manual_seed(0)
    model = build_model("keye-nano").eval()
    published = _published_nano_state(model)
    src = tmp_path / "published"
    write_published(published, src, max_shard_bytes=2_000_000)
    index = json.loads((src / INDEX_NAME).read_text())
    assert len(set(index["weight_map"].values())) > 1  # really sharded

    adapter = load_published(model, src)
    text = model.config.text_config
    I = text.moe_intermediate_size
    fused = model.get_parameter("model.layers.2.mlp.experts.gate_up_proj")
    assert torch.equal(fused[3, :I], published["model.layers.2.mlp.experts.3.gate_proj.weight"])
    assert torch.equal(fused[3, I:], published["model.layers.2.mlp.experts.3.up_proj.weight"])
    assert torch.equal(model.get_parameter("model.layers.1.mlp.experts.down_proj")[0],
                       published["model.layers.1.mlp.experts.0.down_proj.weight"])
    assert torch.equal(model.get_parameter("mlp_AR.linear_1.weight"), published["mlp_AR.linear_1.weight"])

    # logits: transformers' own Qwen3-MoE, reading the per-expert text weights its own way
    lm_dir = tmp_path / "lm"
    text.save_pretrained(lm_dir)
    lm_state = {k: v for k, v in published.items() if k.startswith(("model.", "lm_head."))}
    write_published(lm_state, lm_dir)
    ref = Qwen3MoeForCausalLM.from_pretrained(lm_dir).eval()
    ids = torch.randint(0, 2000, (1, 13))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)

    out = tmp_path / "saved"
    save_published(model, out, adapter=adapter, max_shard_bytes=2_000_000)
    saved = read_published(out)
    assert set(saved) == set(published)
    for name, tensor in published.items():
        assert torch.equal(saved[name], tensor), name
    shard = sorted(out.glob("model-*.safetensors"))[0]
    assert set(load_file(str(shard))) <= set(published)


def test_published_config_round_trip_and_model_from_folder(tmp_path):
    import torch as _t

    from keye.models import build_config
    from keye.models.adapter import config_from_published, config_to_published, load_published_model

    for name in ("keye-nano", "keye-vl-1.5-8b", "keye-vl-2.0-30b-a3b"):
        cfg = build_config(name)
        back = config_from_published(json.loads(json.dumps(config_to_published(cfg))))
        assert back.text_config.model_type == cfg.text_config.model_type, name
        assert back.mrope_section == cfg.mrope_section and back.video_token_id == cfg.video_token_id
        for key in ("hidden_size", "num_hidden_layers", "vocab_size", "num_key_value_heads", "head_dim"):
            assert getattr(back.text_config, key) == getattr(cfg.text_config, key), (name, key)
        assert back.text_config.rope_parameters["rope_theta"] == cfg.text_config.rope_parameters["rope_theta"]
        assert back.vision_config.image_size == cfg.vision_config.image_size
    assert config_to_published(build_config("keye-vl-1.5-8b"))["rope_scaling"]["mrope_section"] == [16, 24, 24]

    _t.manual_seed(0)
    model = build_model("keye-nano").eval()
    save_published(model, tmp_path / "ckpt", max_shard_bytes=3_000_000)
    loaded, _ = load_published_model(tmp_path / "ckpt")
    ids = _t.randint(0, 2000, (1, 9))
    with _t.no_grad():
        assert _t.equal(loaded.eval()(input_ids=ids).logits, model(input_ids=ids).logits)


# ----------------------------------------------------------------------------- the published config, whole


def _published_nano_config() -> dict:
    """keye-nano's config in the published layout, spelled the way a release file may spell it: mRoPE as
    ``type: mrope``, a rope_theta integer, fields the toolkit does not read (written for this test)."""
    from keye.models import build_config
    from keye.models.adapter import config_to_published

    published = config_to_published(build_config("keye-nano"))
    published.pop("vision_start_token_id")  # an optional field the file leaves out stays out
    published["rope_theta"] = 10000
    published["rope_scaling"] = {"type": "mrope", "mrope_section": [4, 6, 6]}
    published.update(architectures=["KeyeVL1_5ForConditionalGeneration"], model_type="KeyeVL1_5",
                     torch_dtype="bfloat16", use_sliding_window=False, a_later_release_field={"nested": [1, 2.5]})
    published["vision_config"].update(model_type="siglip_vision_model", tokens_per_second=2, temporal_patch_size=2)
    return published


def test_published_config_round_trips_whole_and_keeps_unknown_fields(tmp_path):
    from keye.models import KeyeConfig
    from keye.models.adapter import config_from_published, config_to_published, load_published_model

    published = _published_nano_config()
    config = config_from_published(json.loads(json.dumps(published)))
    assert config_to_published(config) == published
    assert config.text_config.rope_parameters["rope_type"] == "default" and config.mrope_section == [4, 6, 6]

    # through a toolkit checkpoint's config.json and back
    config.save_pretrained(tmp_path / "toolkit")
    assert config_to_published(KeyeConfig.from_pretrained(tmp_path / "toolkit")) == published

    # a changed field is written anew, everything else as the file had it
    config.text_config.num_hidden_layers = 3
    config.vision_config.layer_norm_eps = 1e-5
    changed = config_to_published(config)
    assert changed["num_hidden_layers"] == 3 and changed["vision_config"]["layer_norm_eps"] == 1e-5
    assert changed["vision_config"]["tokens_per_second"] == 2
    assert {k: v for k, v in changed.items() if k not in ("num_hidden_layers", "vision_config")} == {
        k: v for k, v in published.items() if k not in ("num_hidden_layers", "vision_config")}

    # a published folder: the config.json written on save is the one that was read
    torch.manual_seed(0)
    model = build_model("keye-nano").eval()
    save_published(model, tmp_path / "src", max_shard_bytes=3_000_000)
    (tmp_path / "src" / "config.json").write_text(json.dumps(published))
    loaded, adapter = load_published_model(tmp_path / "src")
    save_published(loaded, tmp_path / "out", adapter=adapter)
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == published


# One example per RoPE type: every type transformers' ROPE_INIT_FUNCTIONS knows must be here (checked
# below), so a new transformers type fails this file until it is covered. Lengths fit keye-nano's head_dim 32.
ROPE_EXAMPLES = {
    "default": {},
    "linear": {"factor": 2.0},
    "dynamic": {"factor": 2.0},
    "yarn": {"factor": 4.0, "original_max_position_embeddings": 16},
    "longrope": {"short_factor": [1.0 + i / 16 for i in range(16)], "long_factor": [1.0 + i / 4 for i in range(16)],
                 "original_max_position_embeddings": 16},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    "proportional": {"partial_rotary_factor": 0.5, "factor": 2.0},
}


def test_every_transformers_rope_type_has_an_example():
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    assert set(ROPE_EXAMPLES) == {"default", *ROPE_INIT_FUNCTIONS}


def _rope_config(kind: str, spelling: str = "type"):
    from keye.models.adapter import config_from_published

    published = _published_nano_config()
    published["max_position_embeddings"] = 32  # positions below go past it: dynamic / longrope switch
    published["rope_scaling"] = {spelling: kind, "mrope_section": [4, 6, 6], **ROPE_EXAMPLES[kind]}
    return config_from_published(published)


@pytest.mark.parametrize("kind", sorted(ROPE_EXAMPLES))
def test_rope_scaling_type_is_applied_as_transformers_applies_it(kind):
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding

    from keye.models import KeyeForConditionalGeneration

    config = _rope_config(kind, spelling="rope_type" if kind == "linear" else "type")
    text = config.text_config
    # reference: transformers' Qwen2-VL mRoPE, which applies the type with its own ROPE_INIT_FUNCTIONS
    ref = Qwen2VLRotaryEmbedding(Qwen2VLTextConfig(
        hidden_size=text.hidden_size, num_attention_heads=text.num_attention_heads, head_dim=text.head_dim,
        max_position_embeddings=32, rope_parameters={"rope_type": kind, "rope_theta": 10000.0,
                                                     "mrope_section": [4, 6, 6], **ROPE_EXAMPLES[kind]}))
    ours = KeyeForConditionalGeneration(config).model.rotary_emb
    plain = KeyeForConditionalGeneration(_rope_config("default")).model.rotary_emb
    x = torch.zeros(2, 9, text.hidden_size)
    pos_3BL = torch.randint(0, 60, (3, 2, 9))
    pos_3BL[0] = pos_3BL[0].clamp(max=20)  # the temporal axis stays short: the largest position of any axis counts
    for a, b in zip(ours(x, pos_3BL), ref(x, pos_3BL)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    if kind != "default":
        assert not torch.allclose(ours(x, pos_3BL)[0], plain(x, pos_3BL)[0], atol=1e-3), "the type changed nothing"


def test_linear_rope_scaling_reaches_the_logits():
    from transformers import Qwen3MoeConfig

    from keye.models import KeyeForConditionalGeneration

    config = _rope_config("linear")
    torch.manual_seed(0)
    model = KeyeForConditionalGeneration(config).eval()
    text = config.text_config.to_dict()
    ref = Qwen3MoeForCausalLM(Qwen3MoeConfig(**text)).eval()
    assert ref.config.rope_parameters["factor"] == 2.0
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith(("model.", "lm_head."))})
    plain = KeyeForConditionalGeneration(_rope_config("default")).eval()
    plain.load_state_dict(model.state_dict())
    ids = torch.randint(0, 2000, (1, 40))
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        torch.testing.assert_close(logits, ref(input_ids=ids).logits, rtol=1e-5, atol=1e-5)
        assert (logits - plain(input_ids=ids).logits).abs().max() > 1e-2


def test_bad_rope_scaling_is_a_config_error():
    from keye.errors import ConfigError
    from keye.models.adapter import config_from_published

    published = _published_nano_config()
    for rope, message in (
        ({"type": "warp", "factor": 2.0}, "type 'warp' is not a RoPE type transformers knows"),
        ({"type": "linear", "rope_type": "yarn", "factor": 2.0}, "'type' and 'rope_type' disagree"),
        ({"type": "linear"}, "factor"),
    ):
        with pytest.raises(ConfigError, match=message):
            config_from_published(dict(published, rope_scaling=rope))


def test_interleaved_mrope_is_read_from_and_written_to_rope_scaling():
    from keye.models import KeyeForConditionalGeneration, build_config
    from keye.models.adapter import config_from_published, config_to_published

    published = _published_nano_config()
    assert not config_from_published(published).mrope_interleaved  # Keye-VL-1.5's layout
    published["rope_scaling"] = {"type": "mrope", "mrope_section": [4, 6, 6], "mrope_interleaved": True}
    config = config_from_published(published)
    assert config.mrope_interleaved and "mrope_interleaved" not in config.text_config.rope_parameters
    assert KeyeForConditionalGeneration(config).model.rotary_emb.interleaved
    written = config_to_published(config)
    assert written["rope_scaling"]["mrope_interleaved"] is True
    assert config_from_published(written).mrope_interleaved
    fresh = config_to_published(build_config("keye-nano", mrope_interleaved=True))
    assert fresh["rope_scaling"]["mrope_interleaved"] is True
