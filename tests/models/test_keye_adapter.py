"""Published-layout adapter: a tiny random checkpoint written in the published naming round-trips."""

import json

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
