"""The run boundaries each decoder kernel receives (keye.models.attention) against dense references."""

import torch
from torch.nn.attention.flex_attention import create_block_mask

from keye.models.attention import Runs, dense_causal_mask, document_block_mask, varlen_sdpa


def layout():
    """Two rows of 700 tokens: long samples (whole 128-token blocks inside one sample), short ones, padding."""
    segment_BL = torch.full((2, 700), -1)
    mask_BL = torch.zeros(2, 700, dtype=torch.long)
    for b, lengths in enumerate([(300, 260, 5, 90), (1, 520, 60)]):
        start = 0
        for k, n in enumerate(lengths):
            segment_BL[b, start:start + n], mask_BL[b, start:start + n] = k, 1
            start += n
    return segment_BL, mask_BL


def test_runs_split_samples_and_padding():
    segment_BL, mask_BL = layout()
    runs = Runs.of(mask_BL, segment_BL)
    assert runs.cu_seqlens.tolist() == [0, 300, 560, 565, 655, 700, 701, 1221, 1281, 1400]
    assert runs.max_length == 520
    padded = Runs.of(mask_BL)  # one sample per row: every real token in one run
    assert padded.cu_seqlens.tolist() == [0, 655, 700, 1281, 1400]


def test_block_mask_equals_the_dense_mask_built_block_by_block():
    segment_BL, mask_BL = layout()
    runs = Runs.of(mask_BL, segment_BL)
    allowed_BLL = dense_causal_mask(runs, torch.float32)[:, 0] == 0
    reference = create_block_mask(lambda b, h, q, k: allowed_BLL[b, q, k], 2, None, 700, 700, device="cpu")
    ours = document_block_mask(runs)
    assert int(ours.full_kv_num_blocks.sum()) > 0  # the layout has blocks that skip the mask
    torch.testing.assert_close(ours.to_dense(), reference.to_dense(), rtol=0, atol=0)
    for mine, theirs in [(ours.kv_num_blocks, reference.kv_num_blocks), (ours.full_kv_num_blocks,
                                                                         reference.full_kv_num_blocks)]:
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    assert torch.equal(ours.mask_mod(torch.tensor(1), 0, torch.tensor(5), torch.tensor(2)), torch.tensor(True))
    assert not bool(ours.mask_mod(torch.tensor(0), 0, torch.tensor(300), torch.tensor(299)))  # next sample


def test_varlen_sdpa_equals_dense_causal_attention_with_grouped_heads():
    torch.manual_seed(0)
    segment_BL, mask_BL = layout()
    runs = Runs.of(mask_BL, segment_BL)
    q, k, v = torch.randn(1400, 4, 8), torch.randn(1400, 2, 8), torch.randn(1400, 2, 8)
    out = varlen_sdpa(q, k, v, runs.cu_seqlens.diff().tolist(), 8**-0.5, causal=True)
    mask_NN = dense_causal_mask(Runs.of(torch.ones(1, 1400), runs.run_BL.view(1, -1)), torch.float32)[0, 0]
    expected = torch.nn.functional.scaled_dot_product_attention(
        q.transpose(0, 1), k.repeat_interleave(2, 1).transpose(0, 1), v.repeat_interleave(2, 1).transpose(0, 1),
        attn_mask=mask_NN, scale=8**-0.5).transpose(0, 1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_varlen_sdpa_under_bf16_autocast_returns_what_sdpa_returns():
    # Qwen3's q/k norms hand float32 queries to attention while v stays bf16 under autocast; SDPA then runs in
    # bf16, and the packed output must take that dtype instead of failing on q's
    torch.manual_seed(0)
    q, k, v = torch.randn(12, 4, 8), torch.randn(12, 2, 8), torch.randn(12, 2, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = varlen_sdpa(q, k, v, [5, 7], 8**-0.5, causal=True)
    expected = varlen_sdpa(q, k, v.float(), [5, 7], 8**-0.5, causal=True)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0.02, atol=0.02)
