"""Keye model: contract, LM parity with transformers' Qwen3-MoE, cache equivalence, batch invariance."""

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, Qwen3MoeForCausalLM

import keye.models  # noqa: F401  (registers the Auto classes)
from keye.errors import KeyeInputError
from keye.models.attention import varlen_sdpa
from keye.models.vision import VisionRotaryEmbedding2D, apply_rotary, varlen_eager
from keye.video.types import FAST, SLOW


def _batch(processor, prompt_factory, clip_factory, clips, questions, answers=None, **kw):
    texts = [prompt_factory(processor, q, a) for q, a in zip(questions, answers or [None] * len(questions))]
    return processor(text=texts, videos=clips, return_labels=answers is not None, **kw)


def test_nano_contract_forward_backward_save_load(nano, processor, prompt_factory, clip_factory, tmp_path):
    clip = clip_factory([((56, 84), SLOW), ((28, 56), FAST), ((56, 84), SLOW)])
    batch = _batch(processor, prompt_factory, clip_factory, [clip], ["What moves?"], ["The red ball."])
    nano.train()
    out = nano(**batch)
    assert out.logits.shape == (*batch["input_ids"].shape, nano.config.text_config.vocab_size)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.loss)
    # MoE: the router load-balancing loss is part of the training loss by default
    coef = nano.config.text_config.router_aux_loss_coef
    torch.testing.assert_close(out.loss, out.lm_loss + coef * out.aux_loss)
    out.loss.backward()
    for name in ("visual.vision_model.embeddings.patch_embedding.weight", "mlp_AR.linear_1.weight",
                 "model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.gate.weight", "lm_head.weight"):
        grad = nano.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name

    nano.eval()
    nano.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "keye"
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(nano)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, nano(**batch).logits, rtol=0, atol=0)
    proc2 = AutoProcessor.from_pretrained(tmp_path)
    assert torch.equal(proc2(text=[prompt_factory(proc2, "What moves?")], videos=[clip])["input_ids"],
                       processor(text=[prompt_factory(processor, "What moves?")], videos=[clip])["input_ids"])


def test_language_model_matches_transformers_qwen3_moe(nano):
    ref = Qwen3MoeForCausalLM(nano.config.text_config).eval()
    missing, unexpected = ref.load_state_dict(
        {k: v for k, v in nano.state_dict().items() if k.startswith(("model.", "lm_head."))}, strict=False
    )
    assert not missing and not unexpected
    ids = torch.randint(0, 2000, (2, 17))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding in the second row
    with torch.no_grad():
        ours = nano(input_ids=ids, attention_mask=mask, labels=ids, output_router_logits=True)
        theirs = ref(input_ids=ids, attention_mask=mask, output_router_logits=True)
    keep = mask.bool()
    torch.testing.assert_close(ours.logits[keep], theirs.logits[keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.aux_loss, theirs.aux_loss)


def test_router_z_loss_is_added_when_enabled(nano):
    ids = torch.randint(0, 2000, (1, 12))
    with torch.no_grad():
        base = nano(input_ids=ids, labels=ids)
        logits = torch.cat(base.router_logits).float()
        torch.testing.assert_close(base.z_loss, (torch.logsumexp(logits, -1) ** 2).mean())
        nano.config.router_z_loss_coef = 0.01
        with_z = nano(input_ids=ids, labels=ids)
    torch.testing.assert_close(with_z.loss - base.loss, 0.01 * base.z_loss, rtol=1e-4, atol=1e-6)


def test_greedy_generate_with_cache_equals_recompute_with_video(nano, processor, prompt_factory, clip_factory):
    clip = clip_factory([((56, 56), SLOW), ((28, 28), FAST), ((28, 28), FAST), ((56, 56), SLOW)], seed=3)
    batch = _batch(processor, prompt_factory, clip_factory, [clip], ["Describe the scene."])
    cached = nano.generate(**batch, max_new_tokens=8, do_sample=False, use_cache=True)
    recomputed = nano.generate(**batch, max_new_tokens=8, do_sample=False, use_cache=False)
    assert cached.shape[1] == batch["input_ids"].shape[1] + 8
    assert torch.equal(cached, recomputed)
    # and one explicit recompute step: the last token is the argmax of a full forward pass
    with torch.no_grad():
        full = nano(input_ids=cached[:, :-1], pixel_values_videos=batch["pixel_values_videos"],
                    video_grid_thw=batch["video_grid_thw"])
    assert int(full.logits[0, -1].argmax()) == int(cached[0, -1])


def test_batch_of_mixed_frame_sizes_equals_one_at_a_time(nano, processor, prompt_factory, clip_factory):
    clips = [
        clip_factory([((56, 84), SLOW), ((28, 56), FAST), ((28, 56), FAST)], seed=1),
        clip_factory([((84, 56), SLOW), ((56, 28), FAST), ((84, 56), SLOW), ((28, 28), FAST)], seed=2),
    ]
    questions = ["What is red?", "Count the boxes in the video please."]
    batch = _batch(processor, prompt_factory, clip_factory, clips, questions)
    with torch.no_grad():
        together = nano(**batch).logits
        for b, (clip, q) in enumerate(zip(clips, questions)):
            alone = _batch(processor, prompt_factory, clip_factory, [clip], [q])
            n = alone["input_ids"].shape[1]
            assert torch.equal(batch["input_ids"][b, :n], alone["input_ids"][0])
            torch.testing.assert_close(together[b, :n], nano(**alone).logits[0], rtol=1e-4, atol=1e-4)


def test_pad_count_mismatch_is_an_error(nano, processor, prompt_factory, clip_factory):
    clip = clip_factory([((56, 56), SLOW)])
    batch = _batch(processor, prompt_factory, clip_factory, [clip], ["Hi"])
    ids = batch["input_ids"]
    pad = nano.config.video_token_id
    first = int((ids[0] == pad).nonzero()[0])
    ids = torch.cat([ids[:, :first], ids[:, first + 1 :]], dim=1)  # drop one pad
    try:
        nano(input_ids=ids, pixel_values_videos=batch["pixel_values_videos"], video_grid_thw=batch["video_grid_thw"])
    except KeyeInputError as err:
        assert "pad" in str(err)
    else:
        raise AssertionError("a missing pad token must raise")


def test_varlen_sdpa_equals_block_diagonal_softmax():
    torch.manual_seed(0)
    seqlens = [6, 4, 6, 9]
    q, k, v = (torch.randn(sum(seqlens), 3, 8) for _ in range(3))
    torch.testing.assert_close(varlen_sdpa(q, k, v, seqlens, 8**-0.5), varlen_eager(q, k, v, seqlens, 8**-0.5),
                               rtol=1e-5, atol=1e-5)
    # per-sequence independence: sequence 1 alone gives the same rows
    alone = varlen_sdpa(q[6:10], k[6:10], v[6:10], [4], 8**-0.5)
    torch.testing.assert_close(varlen_sdpa(q, k, v, seqlens, 8**-0.5)[6:10], alone)


def test_vision_rope_matches_flash_style_reference():
    """The public model builds cos/sin as table[(row, col)].flatten(1).repeat(1, 2) and rotates with
    flash-attn's non-interleaved kernel on the first half of cos/sin; written out here independently."""
    head_dim, h, w = 16, 3, 5
    rope = VisionRotaryEmbedding2D(head_dim, 10000.0)
    pos = torch.arange(h * w)
    rows, cols = pos // w, pos % w
    cos, sin = rope(rows, cols)
    x = torch.randn(h * w, 2, head_dim)

    dim = head_dim // 2
    inv = 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim))
    table = torch.outer(torch.arange(max(h, w)).float(), inv)
    emb = table[torch.stack([rows, cols], -1)].flatten(1)  # (N, head_dim/2)
    c, s = emb.cos()[:, None], emb.sin()[:, None]
    x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2 :]
    expected = torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
    torch.testing.assert_close(apply_rotary(x, cos, sin), expected)


def test_encode_api_pools_and_normalizes(nano, processor, prompt_factory, clip_factory):
    clips = [clip_factory([((56, 56), SLOW), ((28, 28), FAST)], seed=4), clip_factory([((28, 56), SLOW)], seed=5)]
    batch = _batch(processor, prompt_factory, clip_factory, clips, ["a", "bb"])
    video_args = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      pixel_values_videos=batch["pixel_values_videos"], video_grid_thw=batch["video_grid_thw"])
    raw = nano.encode_video(**video_args)
    unit = nano.encode_video(**video_args, normalize=True)
    D = nano.config.text_config.hidden_size
    assert raw.shape == unit.shape == (2, D)
    torch.testing.assert_close(unit.norm(dim=-1), torch.ones(2))
    with torch.no_grad():
        hidden = nano(**batch, output_hidden_states=True).hidden_states[-1]
    mask = batch["input_ids"][0] == nano.config.video_token_id
    torch.testing.assert_close(raw[0], hidden[0, mask].mean(0), rtol=1e-5, atol=1e-5)
    text = processor(text=["hello there", "hi"], padding_side="right")
    t = nano.encode_text(text["input_ids"], text["attention_mask"], normalize=True)
    n = int(text["attention_mask"][1].sum())
    assert n < text["input_ids"].shape[1]  # the second row really is padded
    alone = nano.encode_text(text["input_ids"][1:, :n], normalize=True)
    torch.testing.assert_close(t[1], alone[0], rtol=1e-5, atol=1e-5)


def test_nano_learns_a_clip_answer_in_a_few_steps(processor, prompt_factory, clip_factory):
    from keye.models import build_model

    torch.manual_seed(0)
    model = build_model("keye-nano").train()
    clip = clip_factory([((28, 28), SLOW), ((28, 28), FAST)], seed=7)
    batch = _batch(processor, prompt_factory, clip_factory, [clip], ["What is it?"], ["A blue cube."])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_left_padded_batch_generation_equals_single_prompts(nano, processor, prompt_factory, clip_factory):
    clips = [clip_factory([((56, 56), SLOW), ((28, 28), FAST)], seed=1), clip_factory([((28, 56), SLOW)], seed=2)]
    questions = ["What is here?", "Hi there, what do you see now in this short clip of a red ball rolling?"]
    texts = [prompt_factory(processor, q) for q in questions]
    batch = processor(text=texts, videos=clips, padding_side="left")
    assert (batch["attention_mask"][:, 0] == 0).any()  # one row really is left-padded
    pad = processor.tokenizer.pad_token_id
    together = nano.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=pad)
    for b in range(2):
        alone = nano.generate(**processor(text=[texts[b]], videos=[clips[b]]), max_new_tokens=6, do_sample=False,
                              pad_token_id=pad)
        assert torch.equal(together[b, -6:], alone[0, -6:])


def test_dense_qwen3_decoder_with_image_and_video(processor, prompt_factory, clip_factory):
    """The keye-vl-1.5 family (dense Qwen3 decoder) at toy size: parity, loss, cache equivalence."""
    from transformers import Qwen3ForCausalLM

    from keye.models import KeyeConfig, KeyeForConditionalGeneration, build_config
    from keye.video.types import ImageInput

    nano = build_config("keye-nano")
    text = dict(model_type="qwen3", num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                num_key_value_heads=2, head_dim=16, vocab_size=2048, max_position_embeddings=2048)
    ids = {k: getattr(nano, k) for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    torch.manual_seed(0)
    model = KeyeForConditionalGeneration(KeyeConfig(vision_config=nano.vision_config.to_dict(), text_config=text, **ids))
    model.eval()

    ref = Qwen3ForCausalLM(model.config.text_config).eval()
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if k.startswith(("model.", "lm_head."))})
    tok = torch.randint(0, 2000, (1, 11))
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=tok).logits, ref(input_ids=tok).logits, rtol=1e-5, atol=1e-5)

    image = ImageInput(pixels=torch.randint(0, 256, (3, 56, 28), dtype=torch.uint8))
    clip = clip_factory([((28, 56), SLOW), ((28, 28), FAST)], seed=9)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "video"}, {"type": "text", "text": "Same?"}]}]
    prompt = processor(text=[processor.apply_chat_template(messages)], images=[image], videos=[clip])
    cached = model.generate(**prompt, max_new_tokens=5, do_sample=False, use_cache=True)
    assert torch.equal(cached, model.generate(**prompt, max_new_tokens=5, do_sample=False, use_cache=False))
    train = processor(text=[processor.apply_chat_template(messages + [{"role": "assistant", "content": "No."}],
                                                          add_generation_prompt=False)],
                      images=[image], videos=[clip], return_labels=True)
    out = model.train()(**train)
    assert out.aux_loss is None and torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, out.lm_loss)


def test_mrope_matches_transformers_qwen2_vl_rotary(nano):
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding

    text = nano.config.text_config
    ref_cfg = Qwen2VLTextConfig(hidden_size=text.hidden_size, num_attention_heads=text.num_attention_heads,
                                head_dim=text.head_dim, rope_parameters={
                                    "rope_type": "default", "rope_theta": text.rope_parameters["rope_theta"],
                                    "mrope_section": nano.config.mrope_section})
    ref = Qwen2VLRotaryEmbedding(ref_cfg)
    pos = torch.randint(0, 50, (3, 2, 7))
    x = torch.zeros(2, 7, text.hidden_size)
    ours = nano.model.rotary_emb(x, pos)
    for a, b in zip(ours, ref(x, pos)):
        torch.testing.assert_close(a, b)


def test_interleaved_mrope_matches_transformers_qwen3_vl_rotary(nano):
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    from keye.models.modeling import KeyeMRotaryEmbedding

    text = nano.config.text_config
    pos = torch.randint(0, 50, (3, 2, 7))
    x = torch.zeros(2, 7, text.hidden_size)
    for section in (nano.config.mrope_section, [6, 5, 5], [8, 4, 4]):
        ref = Qwen3VLTextRotaryEmbedding(Qwen3VLTextConfig(
            hidden_size=text.hidden_size, num_attention_heads=text.num_attention_heads, head_dim=text.head_dim,
            rope_parameters={"rope_type": "default", "rope_theta": text.rope_parameters["rope_theta"],
                             "mrope_section": section}))
        ours = KeyeMRotaryEmbedding(nano.model.rotary_emb.rotary, section, interleaved=True)
        for a, b in zip(ours(x, pos), ref(x, pos)):
            torch.testing.assert_close(a, b)
    # text tokens (t = h = w) rotate alike in both layouts; visual tokens (h, w apart) do not
    contiguous = nano.model.rotary_emb
    text_pos = torch.arange(7).expand(3, 2, 7)
    for a, b in zip(ours(x, text_pos), contiguous(x, text_pos)):
        torch.testing.assert_close(a, b)
    assert not torch.allclose(ours(x, pos)[0], contiguous(x, pos)[0])


def test_mrope_positions_for_a_vision_block(nano):
    from keye.models.modeling import mrope_positions

    v = nano.config.video_token_id
    ids = torch.tensor([[7, 8, v, v, v, v, v, v, 9, v, v, 10]])
    grid = torch.tensor([[1, 4, 6], [1, 2, 4]])  # 2x3 then 1x2 merged tokens
    pos, delta = mrope_positions(ids, torch.ones_like(ids), nano.config, video_grid_thw=grid)
    t, h, w = pos[:, 0].tolist()
    assert t == [0, 1, 2, 2, 2, 2, 2, 2, 5, 6, 6, 8]
    assert h == [0, 1, 2, 2, 2, 3, 3, 3, 5, 6, 6, 8]
    assert w == [0, 1, 2, 3, 4, 2, 3, 4, 5, 6, 7, 8]
    assert delta.tolist() == [[9 - 12]]


def test_sparse_logits_loss_and_gradients_equal_the_dense_loss(nano, processor, prompt_factory, clip_factory):
    clip = clip_factory([((56, 84), SLOW), ((28, 56), FAST)])
    batch = _batch(processor, prompt_factory, clip_factory, [clip, clip], ["What moves?", "Which colour?"],
                   ["The red ball.", "Blue"])
    grads = {}
    for sparse in (False, True):
        nano.zero_grad()
        for num_items in (None, 7):
            extra = {} if num_items is None else {"num_items_in_batch": num_items}
            out = nano(**batch, sparse_logits=sparse, **extra)
            grads[sparse, num_items] = out.lm_loss.detach()
            assert (out.logits is None) == sparse
        out.loss.backward()
        grads[sparse] = nano.lm_head.weight.grad.clone()
    for num_items in (None, 7):
        torch.testing.assert_close(grads[True, num_items], grads[False, num_items])
    torch.testing.assert_close(grads[True], grads[False])
