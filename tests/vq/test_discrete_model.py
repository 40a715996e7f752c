"""keye-nano with vision_mode="discrete": the Kelix path through the same forward, generate and embeddings."""

import pytest
import torch
from transformers import AutoModelForImageTextToText

import keye.models  # noqa: F401  (registers the Auto classes)
from keye.errors import ConfigError
from keye.models import build_config, build_model
from keye.models.modeling import KeyeForConditionalGeneration, discrete_from_continuous
from keye.models.visual_tokenizer import (KeyeVisualTokenizer, fit_code_embeddings, merged_vit_features,
                                         save_visual_tokenizer, split_code_ids)
from keye.processing import load_nano_processor
from keye.train.optim import apply_freeze_plan
from keye.video.types import FAST, SLOW, VideoClip


def small_discrete(seed=0):
    torch.manual_seed(seed)
    config = build_config("keye-nano", vision_mode="discrete")
    config.visual_tokenizer_config.codebook_size = 32
    return KeyeForConditionalGeneration(config).eval()


def make_clip(seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = [((56, 56), SLOW), ((28, 28), FAST), ((56, 56), SLOW)]
    frames = [torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=g) for (h, w), _ in sizes]
    return VideoClip(frames=frames, frame_types=torch.tensor([t for _, t in sizes], dtype=torch.int32),
                     timestamps=torch.arange(3, dtype=torch.float32) * 0.5, indices=torch.arange(3),
                     slow_size=(56, 56), fast_size=(28, 28), source_fps=2.0)


@pytest.fixture(scope="module")
def processor():
    return load_nano_processor()


def batch_for(processor, answer=None, seed=0):
    content = [{"type": "video", "video": "x.mp4"}, {"type": "text", "text": "What moves?"}]
    messages = [{"role": "user", "content": content}]
    if answer:
        messages.append({"role": "assistant", "content": answer})
    text = processor.apply_chat_template(messages, add_generation_prompt=answer is None)
    return processor(text=[text], videos=[make_clip(seed)], return_labels=answer is not None)


def test_visual_positions_get_the_sum_of_their_code_embeddings_and_only_code_rows_train(processor):
    model = small_discrete()
    batch = batch_for(processor, "The red ball.")
    vq = model.config.visual_tokenizer_config
    vocab = model.config.text_config.vocab_size
    ids_PN = model.visual_code_ids(batch["pixel_values_videos"], batch["video_grid_thw"])
    pads = batch["input_ids"] == model.config.video_token_id
    assert ids_PN.shape == (int(pads.sum()), vq.num_codebooks)
    assert int(ids_PN.min()) >= vocab and int(ids_PN.max()) < vocab + vq.num_codes
    # the ids are the tokenizer's codes of the merged ViT features, in codebook blocks
    with torch.no_grad():
        feats = merged_vit_features(model.visual, batch["pixel_values_videos"], batch["video_grid_thw"], 2)
    assert torch.equal(split_code_ids(ids_PN, vocab, vq.codebook_size), model.visual_tokenizer.encode(feats))

    table = model.model.visual_embed_tokens.weight
    expected = sum(table[ids_PN[:, i] - vocab] for i in range(vq.num_codebooks))
    embeds = model._embed(batch["input_ids"], None, None, None, batch["pixel_values_videos"], batch["video_grid_thw"])
    torch.testing.assert_close(embeds[pads], expected, rtol=0, atol=0)
    torch.testing.assert_close(embeds[~pads], model.model.embed_tokens(batch["input_ids"][~pads]), rtol=0, atol=0)

    model.train()
    out = model(**batch)
    assert out.logits.shape[-1] == vocab  # the head predicts text only
    out.loss.backward()
    grad = model.model.visual_embed_tokens.weight.grad
    used = torch.zeros(vq.num_codes, dtype=torch.bool)
    used[(ids_PN - vocab).flatten()] = True
    assert grad[used].abs().sum(-1).gt(0).all() and grad[~used].abs().sum() == 0
    # discrete codes cut the graph: nothing upstream of the code table gets a gradient
    for name, p in model.named_parameters():
        if name.startswith(("visual.", "visual_tokenizer.")):
            assert p.grad is None, name
    assert not hasattr(model, "mlp_AR")
    # the stages' freeze plans: code embeddings take mlp_AR's place (projector group), the tokenizer is vq
    counts = apply_freeze_plan(model, ["projector"])
    assert model.model.visual_embed_tokens.weight.requires_grad
    assert not any(p.requires_grad for n, p in model.named_parameters() if not n.startswith("model.visual_embed_tokens."))
    assert counts == {"projector": model.model.visual_embed_tokens.weight.numel()}
    counts = apply_freeze_plan(model, ["vision", "lm"])  # a stage's usual list: the ViT still stays frozen
    assert "vision" not in counts and not any(p.requires_grad for p in model.visual.parameters())
    assert not model.model.visual_embed_tokens.weight.requires_grad
    assert not any(p.requires_grad for p in model.visual_tokenizer.parameters())
    assert counts["lm"] == sum(p.numel() for n, p in model.named_parameters()
                               if n.startswith(("model.", "lm_head.")) and not n.startswith("model.visual_embed_tokens."))


def test_discrete_save_load_and_cached_generation_equal_recompute(processor, tmp_path):
    model = small_discrete(seed=1)
    batch = batch_for(processor, seed=2)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert loaded.config.vision_mode == "discrete"
    for a, b in zip(model.visual_tokenizer.state_dict().values(), loaded.visual_tokenizer.state_dict().values()):
        assert torch.equal(a, b)  # frozen SimVQ tables are saved too
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)
    cached = loaded.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=True)
    assert torch.equal(cached, loaded.generate(**batch, max_new_tokens=6, do_sample=False, use_cache=False))
    pooled = loaded.encode_video(batch["input_ids"], batch["pixel_values_videos"], batch["video_grid_thw"],
                                 normalize=True)
    torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(1))


def test_discrete_from_continuous_keeps_vit_and_lm_and_loads_the_trained_tokenizer(processor, tmp_path):
    torch.manual_seed(0)
    continuous = build_model("keye-nano").eval()
    vq = build_config("keye-nano").visual_tokenizer_config
    vq.codebook_size = 16
    trained = KeyeVisualTokenizer(vq, 4 * continuous.config.vision_config.hidden_size)
    batch = batch_for(processor)
    with torch.no_grad():
        feats = merged_vit_features(continuous.visual, batch["pixel_values_videos"], batch["video_grid_thw"], 2)
    trained.kmeans_init(torch.cat([feats] * 2))  # 24 merged tokens: enough vectors for 16 codes
    save_visual_tokenizer(trained, tmp_path)

    twin = discrete_from_continuous(continuous, tmp_path).eval()
    assert twin.config.vision_mode == "discrete" and continuous.config.vision_mode == "continuous"
    for name, value in continuous.state_dict().items():
        if not name.startswith("mlp_AR."):
            assert torch.equal(twin.state_dict()[name], value), name
    trained.eval()
    ids = twin.visual_code_ids(batch["pixel_values_videos"], batch["video_grid_thw"])
    assert torch.equal(split_code_ids(ids, twin.config.text_config.vocab_size, 16), trained.encode(feats))
    with torch.no_grad():
        assert torch.isfinite(twin(**batch).logits).all()
    with pytest.raises(ConfigError, match="not in vision_mode"):
        continuous.load_visual_tokenizer(tmp_path)


def test_fitted_code_embeddings_sum_to_the_targets_they_were_fitted_to(processor, tmp_path):
    """Targets that are a linear map of the quantized latent are reproduced exactly by the twin's summed code
    embeddings; the projector's own tokens, which are not, are approached far closer than by fresh embeddings."""
    torch.manual_seed(0)
    continuous = build_model("keye-nano").eval()
    vq = build_config("keye-nano").visual_tokenizer_config
    vq.codebook_size = 16
    tokenizer = KeyeVisualTokenizer(vq, 4 * continuous.config.vision_config.hidden_size).eval()
    batch = batch_for(processor)
    with torch.no_grad():
        feats = merged_vit_features(continuous.visual, batch["pixel_values_videos"], batch["video_grid_thw"], 2)
    tokenizer.kmeans_init(torch.cat([feats] * 2))
    save_visual_tokenizer(tokenizer, tmp_path)
    hidden = continuous.config.text_config.hidden_size

    q = tokenizer.decode_codes(tokenizer.encode(feats)).detach()
    linear = q @ torch.randn(q.shape[1], hidden) + torch.randn(hidden)
    table, explained = fit_code_embeddings(tokenizer, feats, linear, ridge=0.0)
    assert explained == pytest.approx(1.0, abs=1e-6)
    twin = discrete_from_continuous(continuous, tmp_path, table).eval()
    with torch.no_grad():
        inputs = twin.embed_code_ids(twin.visual_code_ids(batch["pixel_values_videos"], batch["video_grid_thw"]))
    torch.testing.assert_close(inputs, linear, atol=1e-4, rtol=1e-4)

    with torch.no_grad():
        projected = continuous.mlp_AR(continuous.visual(batch["pixel_values_videos"], batch["video_grid_thw"]),
                                      batch["video_grid_thw"])
        torch.testing.assert_close(continuous.mlp_AR.project_merged(feats), projected)
        fitted = discrete_from_continuous(continuous, tmp_path, fit_code_embeddings(tokenizer, feats, projected)[0])
        fresh = discrete_from_continuous(continuous, tmp_path)
        errors = [((m.embed_code_ids(m.visual_code_ids(batch["pixel_values_videos"], batch["video_grid_thw"]))
                    - projected).norm() / projected.norm()).item() for m in (fitted, fresh)]
    assert errors[0] < 0.5 * errors[1]
    with pytest.raises(ConfigError, match="code_embeddings"):
        discrete_from_continuous(continuous, tmp_path, table[:-1])


def test_unknown_vision_mode_is_a_config_error():
    with pytest.raises(ConfigError, match="vision_mode"):
        build_model("keye-nano", vision_mode="hybrid")
