"""Itemic tokens: vocabulary expansion on a real tokenizer + tiny Qwen3, and the new-rows-only freeze plan."""

import pytest
import torch

from keye.items.itemic_tokens import (
    SID_BEGIN,
    SID_END,
    add_itemic_tokens,
    format_sid,
    itemic_token_strings,
    new_rows_param_groups,
    train_new_rows_only,
)

SIZES = [8, 8, 4]


def tiny_model_and_tokenizer(tied: bool):
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    from keye.items.encoders import minilm_path

    tok = AutoTokenizer.from_pretrained(str(minilm_path()), local_files_only=True)
    cfg = Qwen3Config(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8, tie_word_embeddings=tied,
    )
    torch.manual_seed(0)
    return Qwen3ForCausalLM(cfg), tok


def test_token_order_follows_openonerec():
    tokens = itemic_token_strings(SIZES)
    assert tokens[:2] == ["<s_a_0>", "<s_a_1>"] and tokens[8] == "<s_b_0>" and tokens[16] == "<s_c_0>"
    assert tokens[-2:] == [SID_BEGIN, SID_END] and len(tokens) == 8 + 8 + 4 + 2
    assert format_sid([3, 7, 1]) == "<|sid_begin|><s_a_3><s_b_7><s_c_1><|sid_end|>"


def test_expansion_pads_to_256_and_tokenizes_a_sid_into_its_tokens():
    model, tok = tiny_model_and_tokenizer(tied=False)
    old_len = len(tok)
    vocab = add_itemic_tokens(tok, model, SIZES)
    assert vocab.first_new_id == old_len and vocab.num_added == 22
    assert vocab.vocab_size % 256 == 0 and vocab.vocab_size >= old_len + 22
    assert model.get_input_embeddings().weight.shape[0] == vocab.vocab_size == model.lm_head.weight.shape[0]
    ids = tok(format_sid([3, 7, 1]), add_special_tokens=False)["input_ids"]
    expected = [vocab.token_to_id[t] for t in [SID_BEGIN, "<s_a_3>", "<s_b_7>", "<s_c_1>", SID_END]]
    assert ids == expected and all(i >= old_len for i in ids)
    # adding again adds nothing and keeps the ids
    again = add_itemic_tokens(tok, model, SIZES)
    assert again.num_added == 0 and again.token_to_id == vocab.token_to_id


@pytest.mark.parametrize("tied", [False, True])
def test_only_new_rows_train(tied):
    model, tok = tiny_model_and_tokenizer(tied=tied)
    vocab = add_itemic_tokens(tok, model, SIZES)
    first = vocab.first_new_id
    train_new_rows_only(model, first)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW(new_rows_param_groups(model, lr=1e-2))
    ids = tok(format_sid([1, 2, 3]) + " hello world " + format_sid([4, 5, 0]), return_tensors="pt")["input_ids"]
    for _ in range(3):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    emb = model.get_input_embeddings().weight
    assert torch.equal(emb[:first], before["model.embed_tokens.weight"][:first])
    used_new = sorted({i for i in ids[0].tolist() if i >= first})
    assert not torch.equal(emb[used_new], before["model.embed_tokens.weight"][used_new])
    if not tied:
        head = model.lm_head.weight
        assert torch.equal(head[:first], before["lm_head.weight"][:first])
        assert not torch.equal(head[first:], before["lm_head.weight"][first:])
    frozen = [n for n in before if n not in ("model.embed_tokens.weight", "lm_head.weight")]
    assert frozen and all(torch.equal(dict(model.named_parameters())[n], before[n]) for n in frozen)


def test_keye_nano_gets_itemic_tokens_and_trains_only_them():
    from keye.models import build_model
    from keye.processing import load_nano_processor

    torch.manual_seed(0)
    model, tok = build_model("keye-nano"), load_nano_processor().tokenizer
    vocab = add_itemic_tokens(tok, model, [64, 64, 64])
    assert vocab.first_new_id == 2016 and vocab.num_added == 194 and vocab.vocab_size == 2304
    assert model.get_output_embeddings().weight.shape[0] == 2304
    train_new_rows_only(model, vocab.first_new_id)
    emb_before = model.get_input_embeddings().weight.detach().clone()
    head_before = model.get_output_embeddings().weight.detach().clone()
    ids = tok(format_sid([1, 2, 3]) + " hello", return_tensors="pt", add_special_tokens=False)["input_ids"]
    opt = torch.optim.AdamW(new_rows_param_groups(model, lr=1e-2))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    first = vocab.first_new_id
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert torch.equal(emb[:first], emb_before[:first]) and torch.equal(head[:first], head_before[:first])
    assert not torch.equal(emb[first:], emb_before[first:]) and not torch.equal(head[first:], head_before[first:])
